//! Opening and validating GGUF files: magic, header, tensor extents, architecture.

use std::fs::File;
use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file;
use memmap2::Mmap;

use crate::error::{EngineError, Result};

/// The model families the engine runs, from `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama and its derivatives (SmolLM2, TinyLlama, Llama 3.x, Mistral).
    Llama,
    /// Qwen2 and Qwen2.5.
    Qwen2,
    /// Gemma 3.
    Gemma3,
}

impl Architecture {
    /// Parses the `general.architecture` string.
    pub fn from_gguf_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "gemma3" => Ok(Self::Gemma3),
            other => Err(EngineError::UnsupportedArchitecture { architecture: other.to_string() }),
        }
    }

    /// The metadata key prefix of the family.
    pub fn key_prefix(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// A GGUF file mapped into memory with its parsed header. Dropping it unmaps the file.
#[derive(Debug)]
pub struct MappedGguf {
    /// The parsed header (metadata and tensor table).
    pub content: gguf_file::Content,
    /// The architecture named in the metadata.
    pub architecture: Architecture,
    /// The file size in bytes.
    pub file_bytes: u64,
    pub(crate) map: Mmap,
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

impl MappedGguf {
    /// Maps `path`, checks the magic bytes, parses the header, checks that every tensor lies
    /// inside the file and that the architecture is supported.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let file_bytes = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        let map = map_file(&file).map_err(|e| EngineError::io(path, e))?;
        if map.len() < GGUF_MAGIC.len() || &map[..4] != GGUF_MAGIC {
            if GGUF_MAGIC.starts_with(&map[..map.len().min(4)]) && map.len() < 4 {
                return Err(EngineError::Truncated {
                    path: path.to_path_buf(),
                    detail: format!("only {} bytes", map.len()),
                });
            }
            return Err(EngineError::NotGguf {
                path: path.to_path_buf(),
                magic: map[..map.len().min(4)].to_vec(),
            });
        }
        let mut cursor = Cursor::new(&map[..]);
        // candle's reader bounds every length by the file, but divides by the file's own
        // `general.alignment` (0 panics): a panic in a third-party parser of an operator's
        // file is an error here, not an abort of tmod.
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(&mut cursor)))
                .map_err(|panic| EngineError::InvalidGguf {
                    path: path.to_path_buf(),
                    detail: format!("the GGUF reader failed on this file ({})", panic_message(&panic)),
                })?;
        let content = read.map_err(|e| {
            let detail = e.to_string();
            if is_eof(&e) {
                EngineError::Truncated {
                    path: path.to_path_buf(),
                    detail: format!("header ends early ({detail})"),
                }
            } else {
                EngineError::InvalidGguf { path: path.to_path_buf(), detail }
            }
        })?;
        check_tensor_extents(path, &content, file_bytes)?;
        let architecture = match content.metadata.get("general.architecture") {
            Some(value) => {
                let name = value.to_string().map_err(|e| EngineError::Metadata {
                    key: "general.architecture".into(),
                    detail: e.to_string(),
                })?;
                Architecture::from_gguf_name(name)?
            }
            None => {
                return Err(EngineError::Metadata {
                    key: "general.architecture".into(),
                    detail: "absent".into(),
                });
            }
        };
        Ok(Self { content, architecture, file_bytes, map })
    }

    /// A metadata value as a string, if present.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.content.metadata.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
    }

    /// A metadata value as an unsigned integer, if present.
    pub fn metadata_u32(&self, key: &str) -> Option<u32> {
        self.content.metadata.get(key).and_then(|v| match v {
            gguf_file::Value::U8(x) => Some(u32::from(*x)),
            gguf_file::Value::U16(x) => Some(u32::from(*x)),
            gguf_file::Value::U32(x) => Some(*x),
            gguf_file::Value::U64(x) => u32::try_from(*x).ok(),
            gguf_file::Value::I32(x) => u32::try_from(*x).ok(),
            gguf_file::Value::I64(x) => u32::try_from(*x).ok(),
            _ => None,
        })
    }
}

#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the file is opened read-only and the engine uses the weights in place for its
    // whole life. Another process truncating or rewriting the model file meanwhile is the one
    // hazard (SIGBUS or changed weights), as for every memory-mapped model runtime (llama.cpp
    // maps by default too): model files are installed once and replaced by a new name
    // (`tmoctl model fetch` writes to a temporary file and renames it).
    unsafe { Mmap::map(file) }
}

fn is_eof(error: &candle_core::Error) -> bool {
    let mut text = error.to_string();
    if let candle_core::Error::Io(io) = error {
        if io.kind() == std::io::ErrorKind::UnexpectedEof {
            return true;
        }
        text = io.to_string();
    }
    text.contains("failed to fill whole buffer") || text.contains("unexpected end of file")
}

/// The text of a caught panic.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// Every tensor's size from its shape and type, in checked arithmetic (the counts come from
/// the file), whole blocks only, and inside the file.
fn check_tensor_extents(path: &Path, content: &gguf_file::Content, file_bytes: u64) -> Result<()> {
    let invalid = |detail: String| EngineError::InvalidGguf { path: path.to_path_buf(), detail };
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let elems = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64)).ok_or_else(|| {
            invalid(format!("tensor `{name}`: shape {dims:?} has more elements than a u64 counts"))
        })?;
        let block = info.ggml_dtype.block_size() as u64;
        if block == 0 || elems % block != 0 {
            return Err(invalid(format!(
                "tensor `{name}`: {elems} elements are not whole blocks of {block} ({:?})",
                info.ggml_dtype
            )));
        }
        let end = (elems / block)
            .checked_mul(info.ggml_dtype.type_size() as u64)
            .and_then(|bytes| content.tensor_data_offset.checked_add(info.offset)?.checked_add(bytes));
        match end {
            Some(end) if end <= file_bytes => {}
            Some(end) => {
                return Err(EngineError::Truncated {
                    path: path.to_path_buf(),
                    detail: format!("tensor `{name}` ends at byte {end} but the file has {file_bytes} bytes"),
                });
            }
            None => return Err(invalid(format!("tensor `{name}`: its end is past any file size"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn architecture_names() {
        assert_eq!(Architecture::from_gguf_name("llama").ok(), Some(Architecture::Llama));
        assert_eq!(Architecture::from_gguf_name("gemma3").ok(), Some(Architecture::Gemma3));
        assert!(matches!(
            Architecture::from_gguf_name("rwkv"),
            Err(EngineError::UnsupportedArchitecture { .. })
        ));
    }

    #[test]
    fn text_file_is_not_gguf() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(b"hello, this is text").expect("write");
        let error = MappedGguf::open(file.path()).expect_err("must fail");
        assert!(matches!(error, EngineError::NotGguf { .. }), "{error}");
    }

    #[test]
    fn header_cut_short_is_truncated() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        // Magic, version 3, then a tensor count cut in the middle.
        file.write_all(b"GGUF\x03\x00\x00\x00\x01\x00").expect("write");
        let error = MappedGguf::open(file.path()).expect_err("must fail");
        assert!(matches!(error, EngineError::Truncated { .. }), "{error}");
    }

    /// A GGUF v3 header: `general.architecture` = llama, the extra metadata given, one tensor
    /// `t` of `dims` (innermost first, as the file stores them) and ggml type `dtype`.
    fn gguf_header(extra: &[(&str, u32, Vec<u8>)], dims: &[u64], dtype: u32) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(1u64.to_le_bytes());
        out.extend((1 + extra.len() as u64).to_le_bytes());
        string(&mut out, "general.architecture");
        out.extend(8u32.to_le_bytes());
        string(&mut out, "llama");
        for (key, value_type, value) in extra {
            string(&mut out, key);
            out.extend(value_type.to_le_bytes());
            out.extend(value);
        }
        string(&mut out, "t");
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(dtype.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out
    }

    fn open_bytes(bytes: &[u8]) -> Result<MappedGguf> {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(bytes).expect("write");
        MappedGguf::open(file.path())
    }

    /// Hostile headers give errors, never a panic, an abort or a huge allocation: an alignment
    /// of 0 (candle divides by it), a shape whose element count overflows, a tensor that is not
    /// whole blocks, a tensor past the end of the file, absurd counts.
    #[test]
    fn hostile_headers_are_errors() {
        let f32_type = 0;
        let q4_0_type = 2;
        let zero_alignment = [("general.alignment", 4u32, 0u32.to_le_bytes().to_vec())];
        let cases: [(Vec<u8>, &str); 4] = [
            (gguf_header(&zero_alignment, &[4], f32_type), "reader failed"),
            (gguf_header(&[], &[1 << 40, 1 << 40, 1 << 40], f32_type), "more elements"),
            (gguf_header(&[], &[33], q4_0_type), "whole blocks"),
            (gguf_header(&[], &[1 << 20], f32_type), "ends at byte"),
        ];
        for (bytes, needle) in cases {
            let error = open_bytes(&bytes).map(|_| ()).expect_err(needle);
            assert!(error.to_string().contains(needle), "{needle}: {error}");
        }
        let mut absurd = b"GGUF".to_vec();
        absurd.extend(3u32.to_le_bytes());
        absurd.extend(u64::MAX.to_le_bytes());
        absurd.extend(u64::MAX.to_le_bytes());
        assert!(open_bytes(&absurd).is_err());
    }

    #[test]
    fn missing_file_is_io_error() {
        let error = MappedGguf::open(Path::new("/nonexistent/model.gguf")).expect_err("must fail");
        assert!(matches!(error, EngineError::Io { .. }), "{error}");
    }
}
