//! Tokenizers from GGUF metadata (byte-level BPE and SentencePiece-style BPE), or from a
//! `tokenizer.json` beside the model, and incremental decoding for streaming.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

use crate::error::{EngineError, Result};

const SPM_SPACE: &str = "\u{2581}";

/// Longest piece whose merges are derived: finding them tries every split of the piece
/// (quadratic in its length). Real SentencePiece vocabularies stay well under it (Gemma 3's
/// longest normal piece is 48 bytes), so a hostile file's longer pieces take no merges instead
/// of hours of work.
const MAX_MERGE_PIECE_BYTES: usize = 128;

/// Largest vocabulary accepted (Gemma 3 has 262,144 tokens).
const MAX_VOCABULARY: usize = 1 << 20;

/// Builds the tokenizer of a model: from the GGUF metadata when its tokenizer model is
/// `gpt2` (byte-level BPE) or `llama` (SentencePiece BPE); otherwise from a `tokenizer.json`
/// in the model's directory.
pub fn load_tokenizer(model_path: &Path, content: &gguf_file::Content) -> Result<Tokenizer> {
    let kind = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .map(|s| s.to_lowercase());
    match kind.as_deref() {
        Some("gpt2") => {
            let mut tokenizer =
                Tokenizer::from_gguf(content).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            let pre = content.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok());
            if let Some(pre_tokenizer) = byte_level_pre_tokenizer(pre.map(String::as_str)) {
                tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
            }
            Ok(tokenizer)
        }
        Some("llama") => sentencepiece_bpe(content),
        other => {
            let beside = model_path.parent().map(|dir| dir.join("tokenizer.json")).filter(|p| p.is_file());
            match beside {
                Some(json) => Tokenizer::from_file(&json)
                    .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", json.display()))),
                None => Err(EngineError::Tokenizer(format!(
                    "GGUF tokenizer model {other:?} is not supported and no tokenizer.json is beside {}",
                    model_path.display()
                ))),
            }
        }
    }
}

/// candle's GGUF conversion knows the qwen2 and llama3 pre-tokenizers; for the others it takes
/// `ByteLevel::default()`, which adds a space before every text segment (after each special
/// token too: `<|im_start|>system` becomes ` system`), unlike GPT-2 and its descendants.
/// Those get GPT-2's byte-level splitting, and SmolLM's one digit per token before it, as
/// their tokenizer.json files and llama.cpp have them.
fn byte_level_pre_tokenizer(pre: Option<&str>) -> Option<PreTokenizerWrapper> {
    let byte_level = || PreTokenizerWrapper::from(ByteLevel::new(false, true, true));
    match pre {
        Some("qwen2" | "smaug-bpe" | "lfm2" | "llama3") => None,
        Some("smollm") => Some(Sequence::new(vec![Digits::new(true).into(), byte_level()]).into()),
        _ => Some(byte_level()),
    }
}

fn string_array(content: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    let values = content
        .metadata
        .get(key)
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| EngineError::Metadata { key: key.into(), detail: "absent or not an array".into() })?;
    values
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| EngineError::Metadata { key: key.into(), detail: e.to_string() })
        })
        .collect()
}

fn number_array(content: &gguf_file::Content, key: &str) -> Option<Vec<f64>> {
    let values = content.metadata.get(key)?.to_vec().ok()?;
    values
        .iter()
        .map(|v| match v {
            gguf_file::Value::F32(x) => Some(f64::from(*x)),
            gguf_file::Value::F64(x) => Some(*x),
            gguf_file::Value::I32(x) => Some(f64::from(*x)),
            gguf_file::Value::U32(x) => Some(f64::from(*x)),
            gguf_file::Value::I8(x) => Some(f64::from(*x)),
            gguf_file::Value::U8(x) => Some(f64::from(*x)),
            _ => None,
        })
        .collect()
}

/// SentencePiece BPE (llama.cpp's "llama" tokenizer model): the merges are not stored, so they
/// are derived from the scores the way SentencePiece applies them (a pair merges if the joined
/// piece is in the vocabulary; the higher the joined piece's score, the earlier it merges).
fn sentencepiece_bpe(content: &gguf_file::Content) -> Result<Tokenizer> {
    let tokens = string_array(content, "tokenizer.ggml.tokens")?;
    if tokens.len() > MAX_VOCABULARY {
        return Err(EngineError::Metadata {
            key: "tokenizer.ggml.tokens".into(),
            detail: format!("{} tokens, more than the {MAX_VOCABULARY} a vocabulary may have", tokens.len()),
        });
    }
    let scores = number_array(content, "tokenizer.ggml.scores")
        .unwrap_or_else(|| (0..tokens.len()).map(|i| -(i as f64)).collect());
    let types = number_array(content, "tokenizer.ggml.token_type").unwrap_or_else(|| vec![1.0; tokens.len()]);
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err(EngineError::Metadata {
            key: "tokenizer.ggml.scores".into(),
            detail: "length differs from tokenizer.ggml.tokens".into(),
        });
    }
    let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    // Only normal pieces (type 1) take part in merges.
    let mut merges: Vec<(f64, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] as i64 != 1 || piece.chars().nth(1).is_none() || piece.len() > MAX_MERGE_PIECE_BYTES {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(l), Some(r)) = (vocab.get(left), vocab.get(right))
                && types[*l as usize] as i64 == 1
                && types[*r as usize] as i64 == 1
            {
                merges.push((scores[id], id as u32, left.to_string(), right.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges: Vec<(String, String)> = merges.into_iter().map(|(_, _, l, r)| (l, r)).collect();
    let unk = content
        .metadata
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|id| tokens.get(id as usize).cloned());
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let add_space_prefix = content
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let replace = Replace::new(" ", SPM_SPACE).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    let undo = tokenizers::decoders::DecoderWrapper::Replace(
        Replace::new(SPM_SPACE, " ").map_err(|e| EngineError::Tokenizer(e.to_string()))?,
    );
    let mut decoders: Vec<DecoderWrapper> =
        vec![undo, DecoderWrapper::ByteFallback(ByteFallback::new()), DecoderWrapper::Fuse(Fuse::new())];
    if add_space_prefix {
        tokenizer
            .with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
                NormalizerWrapper::Prepend(Prepend::new(SPM_SPACE.to_string())),
                NormalizerWrapper::Replace(replace),
            ]))))
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    } else {
        tokenizer
            .with_normalizer(Some(NormalizerWrapper::Replace(replace)))
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    }
    tokenizer.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(decoders))));

    // Control (3) and user-defined (4) tokens are matched whole in the text; control tokens
    // are special (left out of decoded text), user-defined ones are text (Gemma's "\n\n").
    let whole = |kind: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t as i64 == kind)
            .map(|(tok, _)| AddedToken::from(tok.clone(), special))
            .collect()
    };
    tokenizer.add_special_tokens(whole(3, true)).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    tokenizer.add_tokens(whole(4, false)).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}

/// Encodes `text` without adding any special token (the chat template writes them).
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| EngineError::Tokenizer(e.to_string()))
}

/// Turns a growing token sequence into text pieces as soon as they are complete UTF-8.
#[derive(Debug, Default)]
pub struct TextStream {
    tokens: Vec<u32>,
    emitted_bytes: usize,
}

impl TextStream {
    /// Appends a token; returns the new text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<Option<String>> {
        self.tokens.push(token);
        let text = tokenizer.decode(&self.tokens, true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        if text.ends_with('\u{fffd}') {
            return Ok(None);
        }
        match text.get(self.emitted_bytes..) {
            Some(piece) if !piece.is_empty() => {
                let piece = piece.to_string();
                self.emitted_bytes = text.len();
                Ok(Some(piece))
            }
            _ => Ok(None),
        }
    }

    /// The whole decoded text so far.
    pub fn text(&self, tokenizer: &Tokenizer) -> Result<String> {
        tokenizer.decode(&self.tokens, true).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }
}

#[cfg(test)]
mod hostile_tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

    fn content(tokens: Vec<String>) -> Content {
        let types = vec![Value::I32(1); tokens.len()];
        let metadata = [
            ("tokenizer.ggml.model".to_owned(), Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens".to_owned(),
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.token_type".to_owned(), Value::Array(types)),
            ("tokenizer.ggml.add_space_prefix".to_owned(), Value::Bool(false)),
        ];
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: metadata.into_iter().collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    /// A vocabulary of long pieces built to make the merge search quadratic (every prefix and
    /// suffix of each is a token too) loads at once: before, the 64 kB pieces cost about 10^11
    /// substring hashes. Short real pieces still get their merges.
    #[test]
    fn long_pieces_take_no_merge_search() {
        let mut tokens: Vec<String> = vec!["a".into(), "b".into(), "ab".into()];
        tokens.extend((0..64).map(|i| format!("{}{}", "a".repeat(65_536 + i), "b")));
        let tokenizer =
            load_tokenizer(Path::new("/nonexistent/model.gguf"), &content(tokens)).expect("tokenizer");
        assert_eq!(encode(&tokenizer, "ab").expect("encode"), vec![2]);
        let too_many = content(vec!["x".into(); MAX_VOCABULARY + 1]);
        assert!(matches!(
            load_tokenizer(Path::new("/nonexistent/model.gguf"), &too_many),
            Err(EngineError::Metadata { .. })
        ));
    }
}
