//! What a request may ask for, shared by every front end: the conversation is checked and the
//! wire options are turned into engine options within the configured bounds, so every front
//! accepts and refuses exactly the same requests with the same messages. (The prompt's
//! length in tokens is checked when the engine takes it: only the engine can count them.)

use std::time::Instant;

use serde::Deserialize;
use serde_json::Map;

use super::conversation::{Conversation, Role};
use super::request::{AnswerRequest, Front};
use crate::config::{Config, RecoveryMode};
use crate::engine::{OpenerOptions, RequestError, Sampling};

/// The configured bounds (the [opener], [conversation] and [cloud] sections).
#[derive(Debug, Clone)]
pub struct Admission {
    pub defaults: OpenerOptions,
    pub max_words_limit: usize,
    pub max_query_chars: usize,
    pub max_messages: usize,
    pub max_conversation_bytes: usize,
    /// The voice policy's sentence length and word cap.
    pub voice_min_chars: usize,
    pub voice_max_words: usize,
    pub recovery: RecoveryMode,
}

impl Admission {
    pub fn from_config(c: &Config) -> Self {
        Self {
            defaults: OpenerOptions {
                min_words: c.opener.min_words,
                max_words: c.opener.max_words,
                max_tokens: c.opener.max_tokens,
                ..Default::default()
            },
            max_words_limit: c.opener.max_words_limit,
            max_query_chars: c.opener.max_query_chars,
            max_messages: c.conversation.max_messages,
            max_conversation_bytes: c.conversation.max_bytes,
            voice_min_chars: c.opener.voice_min_chars,
            voice_max_words: c.opener.voice_max_words,
            recovery: c.cloud.recovery,
        }
    }
}

/// Per-request choices as a front end received them; `None` takes the configured default.
/// (MQTT reads this straight from JSON, so unknown fields are refused rather than ignored.)
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestOptions {
    pub min_words: Option<u32>,
    pub max_words: Option<u32>,
    pub recovery: Option<RecoveryMode>,
    /// False keeps the whole answer on the device.
    pub cloud: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    /// The voice policy: a whole first sentence long enough to be spoken on its own.
    pub voice: Option<bool>,
}

impl Admission {
    /// Checks a one-question request and its options; the error says what to change.
    pub fn admit(&self, id: String, front: Front, arrived: Instant, query: String, opt: &RequestOptions) -> Result<AnswerRequest, RequestError> {
        self.admit_conversation(id, front, arrived, Conversation::question(query), opt)
    }

    /// Checks a conversation and the options. A conversation whose last message is not the
    /// user's (a tool result to read, an assistant's own start) gets no opener: the device
    /// has nothing to say first there.
    pub fn admit_conversation(
        &self,
        id: String,
        front: Front,
        arrived: Instant,
        conversation: Conversation,
        opt: &RequestOptions,
    ) -> Result<AnswerRequest, RequestError> {
        self.check(&conversation)?;
        let opener = self.opener(opt)?;
        let opener = (conversation.last_role() == Some(Role::User)).then_some(opener);
        Ok(AnswerRequest {
            id,
            front,
            arrived,
            conversation,
            opener,
            recovery: opt.recovery.unwrap_or(self.recovery),
            use_cloud: opt.cloud.unwrap_or(true),
            cloud_params: Map::new(),
            conversation_id: None,
        })
    }

    fn check(&self, c: &Conversation) -> Result<(), RequestError> {
        if c.messages.is_empty() || !c.messages.iter().any(|m| m.role == Role::User) || c.query().trim().is_empty() {
            return Err(RequestError::EmptyQuery);
        }
        let chars = c.query().chars().count();
        if chars > self.max_query_chars {
            return Err(RequestError::QueryTooLong { chars, limit: self.max_query_chars });
        }
        if c.messages.len() > self.max_messages {
            return Err(RequestError::InvalidOptions(format!(
                "the conversation has {} messages, more than the {} allowed (conversation.max_messages); send fewer earlier turns",
                c.messages.len(),
                self.max_messages
            )));
        }
        let bytes = c.bytes();
        if bytes > self.max_conversation_bytes {
            return Err(RequestError::InvalidOptions(format!(
                "the conversation is {bytes} bytes, more than the {} allowed (conversation.max_bytes); send fewer earlier turns",
                self.max_conversation_bytes
            )));
        }
        Ok(())
    }

    /// The engine's options for `opt` within the configured bounds.
    fn opener(&self, opt: &RequestOptions) -> Result<OpenerOptions, RequestError> {
        let mut o = self.defaults.clone();
        let voice = opt.voice.unwrap_or(false);
        if voice {
            o.sentence_chars = Some(self.voice_min_chars);
            o.max_words = self.voice_max_words;
            o.min_words = o.min_words.min(o.max_words);
        }
        if let Some(n) = opt.min_words {
            o.min_words = n as usize;
        }
        if let Some(n) = opt.max_words {
            o.max_words = n as usize;
        }
        let limit = if voice { self.voice_max_words.max(self.max_words_limit) } else { self.max_words_limit };
        if o.max_words > limit {
            let setting = if voice { "opener.voice_max_words" } else { "opener.max_words_limit" };
            return Err(RequestError::InvalidOptions(format!("max_words {} is above this server's limit of {limit} ({setting})", o.max_words)));
        }
        o.sampling = Sampling {
            temperature: opt.temperature.unwrap_or(o.sampling.temperature),
            top_k: opt.top_k.map(|k| k as usize).unwrap_or(o.sampling.top_k),
            top_p: opt.top_p.unwrap_or(o.sampling.top_p),
            seed: opt.seed.or(o.sampling.seed),
        };
        o.validate()?;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(query: &str, opt: RequestOptions) -> Result<AnswerRequest, RequestError> {
        Admission::from_config(&Config::default()).admit("r1".into(), Front::Grpc, Instant::now(), query.into(), &opt)
    }

    #[test]
    fn defaults_fill_what_the_request_leaves_out() {
        let r = req("Hi there?", RequestOptions { max_words: Some(6), recovery: Some(RecoveryMode::Humor), ..Default::default() }).unwrap();
        let o = r.opener.unwrap();
        assert_eq!((o.min_words, o.max_words, o.sentence_chars), (4, 6, None));
        assert_eq!(r.recovery, RecoveryMode::Humor);
        assert!(r.use_cloud);
    }

    #[test]
    fn out_of_bounds_requests_name_the_limit() {
        assert_eq!(req("  ", RequestOptions::default()).unwrap_err(), RequestError::EmptyQuery);
        assert!(matches!(req(&"a".repeat(2001), RequestOptions::default()), Err(RequestError::QueryTooLong { chars: 2001, limit: 2000 })));
        let e = req("Hi?", RequestOptions { max_words: Some(40), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("opener.max_words_limit"), "{e}");
        let e = req("Hi?", RequestOptions { min_words: Some(9), max_words: Some(5), ..Default::default() }).unwrap_err();
        assert!(matches!(e, RequestError::InvalidOptions(_)), "{e}");
        let e = req("Hi?", RequestOptions { temperature: Some(-1.0), ..Default::default() }).unwrap_err();
        assert!(matches!(e, RequestError::InvalidOptions(_)), "{e}");
    }

    #[test]
    fn the_voice_policy_asks_for_a_whole_sentence_long_enough_to_speak() {
        let r = req("How long do I boil an egg?", RequestOptions { voice: Some(true), ..Default::default() }).unwrap();
        let o = r.opener.unwrap();
        assert_eq!((o.sentence_chars, o.max_words), (Some(61), 32));
        let e = req("Hi?", RequestOptions { voice: Some(true), max_words: Some(40), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("opener.voice_max_words"), "{e}");
    }

    #[test]
    fn conversations_are_bounded_and_a_tool_result_gets_no_opener() {
        use crate::answer::conversation::Message;
        let a = Admission::from_config(&Config::default());
        let admit = |c: Conversation| a.admit_conversation("r".into(), Front::Grpc, Instant::now(), c, &RequestOptions::default());
        let tool = Conversation { messages: vec![Message::new(Role::User, "Lights on"), Message::new(Role::Tool, "{\"ok\":true}")] };
        assert!(admit(tool).unwrap().opener.is_none());
        let many = Conversation { messages: (0..300).map(|i| Message::new(if i % 2 == 0 { Role::User } else { Role::Assistant }, "hi")).collect() };
        assert!(admit(many).unwrap_err().to_string().contains("conversation.max_messages"));
        let big = Conversation { messages: vec![Message::new(Role::System, "x".repeat(300_000)), Message::new(Role::User, "Hi?")] };
        assert!(admit(big).unwrap_err().to_string().contains("conversation.max_bytes"));
        let only_system = Conversation { messages: vec![Message::new(Role::System, "Be brief.")] };
        assert_eq!(admit(only_system).unwrap_err(), RequestError::EmptyQuery);
    }
}
