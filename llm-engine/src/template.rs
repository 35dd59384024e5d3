//! Chat templates of the supported families, rendered turn by turn so that a conversation
//! can append the tokens of a new turn to the ones already in the KV cache.

use crate::gguf::Architecture;

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The person asking.
    User,
    /// The model's answer.
    Assistant,
}

/// One message of a dialogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self { role: Role::System, content: content.into() }
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: Role::User, content: content.into() }
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self { role: Role::Assistant, content: content.into() }
    }
}

/// The chat formats the engine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\n…<|im_end|>` (SmolLM2, Qwen2/2.5).
    ChatMl,
    /// `<start_of_turn>user\n…<end_of_turn>` (Gemma); no system role, it is folded into the
    /// first user turn.
    Gemma,
    /// `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>` (Llama 3.x).
    Llama3,
    /// `<|user|>\n…</s>` (Zephyr, TinyLlama chat).
    Zephyr,
}

impl ChatTemplate {
    /// Picks the template from the file's `tokenizer.chat_template` text, falling back on the
    /// architecture and on which marker tokens the vocabulary holds.
    pub fn detect(
        architecture: Architecture,
        chat_template: Option<&str>,
        has_token: impl Fn(&str) -> bool,
    ) -> Self {
        if let Some(t) = chat_template {
            if t.contains("<|im_start|>") {
                return Self::ChatMl;
            }
            if t.contains("<start_of_turn>") {
                return Self::Gemma;
            }
            if t.contains("<|start_header_id|>") {
                return Self::Llama3;
            }
            if t.contains("<|user|>") {
                return Self::Zephyr;
            }
        }
        match architecture {
            Architecture::Qwen2 => Self::ChatMl,
            Architecture::Gemma3 => Self::Gemma,
            Architecture::Llama if has_token("<|im_start|>") => Self::ChatMl,
            Architecture::Llama if has_token("<|eot_id|>") => Self::Llama3,
            Architecture::Llama => Self::Zephyr,
        }
    }

    /// The token texts that end an assistant turn.
    pub fn end_of_turn_tokens(self) -> &'static [&'static str] {
        match self {
            Self::ChatMl => &["<|im_end|>", "<|endoftext|>"],
            Self::Gemma => &["<end_of_turn>", "<eos>"],
            Self::Llama3 => &["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"],
            Self::Zephyr => &["</s>"],
        }
    }

    /// Text opening the whole dialogue (the BOS token where the family wants one).
    pub fn dialogue_start(self) -> &'static str {
        match self {
            Self::ChatMl => "",
            Self::Gemma => "<bos>",
            Self::Llama3 => "<|begin_of_text|>",
            Self::Zephyr => "<s>",
        }
    }

    /// The system message, for the families that have a system role (empty otherwise).
    pub fn system_turn(self, system: &str) -> String {
        match self {
            Self::ChatMl => format!("<|im_start|>system\n{system}<|im_end|>\n"),
            Self::Llama3 => {
                format!("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
            }
            Self::Zephyr => format!("<|system|>\n{system}</s>\n"),
            Self::Gemma => String::new(),
        }
    }

    /// A user turn followed by the header of the assistant's answer. `folded_system` is the
    /// system text for families without a system role, given on the first turn only.
    pub fn user_turn(self, user: &str, folded_system: Option<&str>) -> String {
        match self {
            Self::ChatMl => {
                format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
            }
            Self::Llama3 => format!(
                "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>\
                 <|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            Self::Zephyr => format!("<|user|>\n{user}</s>\n<|assistant|>\n"),
            Self::Gemma => match folded_system {
                Some(system) if !system.is_empty() => {
                    format!("<start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n")
                }
                _ => format!("<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"),
            },
        }
    }

    /// Text closing an assistant answer (after its content).
    pub fn assistant_end(self) -> &'static str {
        match self {
            Self::ChatMl => "<|im_end|>\n",
            Self::Gemma => "<end_of_turn>\n",
            Self::Llama3 => "<|eot_id|>",
            Self::Zephyr => "</s>\n",
        }
    }

    /// Whether the family folds the system message into the first user turn.
    pub fn folds_system(self) -> bool {
        matches!(self, Self::Gemma)
    }

    /// Renders a whole dialogue ending with the header of the assistant's next answer.
    pub fn render(self, messages: &[ChatMessage]) -> String {
        let mut out = String::from(self.dialogue_start());
        let mut pending_system: Option<&str> = None;
        for message in messages {
            match message.role {
                Role::System if self.folds_system() => pending_system = Some(&message.content),
                Role::System => out.push_str(&self.system_turn(&message.content)),
                Role::User => out.push_str(&self.user_turn(&message.content, pending_system.take())),
                Role::Assistant => {
                    out.push_str(&message.content);
                    out.push_str(self.assistant_end());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_system_user_and_header() {
        let text = ChatTemplate::ChatMl.render(&[ChatMessage::system("Be brief."), ChatMessage::user("Hi")]);
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn gemma_folds_system_into_first_user_turn() {
        let text = ChatTemplate::Gemma.render(&[
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hi"),
            ChatMessage::assistant("Hello"),
            ChatMessage::user("Again"),
        ]);
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n\
             Hello<end_of_turn>\n<start_of_turn>user\nAgain<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn detection_prefers_the_file_template() {
        let none = |_: &str| false;
        assert_eq!(
            ChatTemplate::detect(Architecture::Llama, Some("{{'<|im_start|>'}}"), none),
            ChatTemplate::ChatMl
        );
        assert_eq!(ChatTemplate::detect(Architecture::Gemma3, None, none), ChatTemplate::Gemma);
        assert_eq!(
            ChatTemplate::detect(Architecture::Llama, None, |t| t == "<|eot_id|>"),
            ChatTemplate::Llama3
        );
        assert_eq!(ChatTemplate::detect(Architecture::Llama, None, none), ChatTemplate::Zephyr);
    }
}
