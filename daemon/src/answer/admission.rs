//! What a request may ask for, shared by every front end: the query is checked and the wire
//! options are turned into engine options within the configured bounds, so every front
//! accepts and refuses exactly the same requests with the same messages. (The prompt's
//! length in tokens is checked when the engine takes it: only the engine can count them.)

use std::time::Instant;

use serde::Deserialize;

use super::request::{AnswerRequest, Front};
use crate::config::{Config, RecoveryMode};
use crate::engine::{OpenerOptions, Prompt, RequestError, Sampling};

/// The configured bounds (the [opener] and [cloud] sections).
#[derive(Debug, Clone)]
pub struct Admission {
    pub defaults: OpenerOptions,
    pub max_words_limit: usize,
    pub max_query_chars: usize,
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
}

impl Admission {
    /// Checks the query and the options; the error says what to change.
    pub fn admit(&self, id: String, front: Front, arrived: Instant, query: String, opt: &RequestOptions) -> Result<AnswerRequest, RequestError> {
        if query.trim().is_empty() {
            return Err(RequestError::EmptyQuery);
        }
        let chars = query.chars().count();
        if chars > self.max_query_chars {
            return Err(RequestError::QueryTooLong { chars, limit: self.max_query_chars });
        }
        let mut o = self.defaults.clone();
        if let Some(n) = opt.min_words {
            o.min_words = n as usize;
        }
        if let Some(n) = opt.max_words {
            o.max_words = n as usize;
        }
        if o.max_words > self.max_words_limit {
            return Err(RequestError::InvalidOptions(format!(
                "max_words {} is above this server's limit of {} (opener.max_words_limit)",
                o.max_words, self.max_words_limit
            )));
        }
        o.sampling = Sampling {
            temperature: opt.temperature.unwrap_or(o.sampling.temperature),
            top_k: opt.top_k.map(|k| k as usize).unwrap_or(o.sampling.top_k),
            top_p: opt.top_p.unwrap_or(o.sampling.top_p),
            seed: opt.seed.or(o.sampling.seed),
        };
        o.validate()?;
        Ok(AnswerRequest {
            id,
            front,
            arrived,
            prompt: Prompt::question(query),
            opener: o,
            recovery: opt.recovery.unwrap_or(self.recovery),
            use_cloud: opt.cloud.unwrap_or(true),
        })
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
        assert_eq!((r.opener.min_words, r.opener.max_words), (4, 6));
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
}
