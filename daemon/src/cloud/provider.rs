//! What the provider sends that mulmd repeats or acts on: error text (scrubbed of the API key,
//! then capped, so no part of the key survives a cut) and the numbers in its headers (parsed
//! with checks and clamps, so no value can panic the answer).

use std::time::Duration;

/// Longest provider text kept in an error message, in characters: enough for "invalid model
/// name (model_not_found)", short enough for one log line and one reply.
pub(crate) const MAX_TEXT_CHARS: usize = 300;

/// Most bytes of an error response body read; the rest is not waited for.
pub(crate) const MAX_ERROR_BODY: usize = 64 * 1024;

/// The shortest run of the key's leading characters that is cut out: providers quote keys
/// whole or masked ("sk-abcdef****wxyz"), and no six leading characters should reach a reader.
const MIN_KEY_PREFIX: usize = 6;

/// Provider text made fit to show: every run of 6 or more of the key's leading characters
/// replaced by `[redacted]`, then (when the text was itself cut short on arrival, `cut`) any
/// shorter start of the key at its very end dropped, then at most [`MAX_TEXT_CHARS`]
/// characters kept. Scrubbing comes before capping, so a key that straddles the cap is gone
/// whole, never left in part.
pub(crate) fn clean(text: &str, key: Option<&str>, cut: bool) -> String {
    let mut s = match key.filter(|k| !k.is_empty()) {
        Some(k) => without_key(text, k, cut),
        None => text.to_string(),
    };
    s = s.trim().to_string();
    if s.chars().count() > MAX_TEXT_CHARS {
        s = s.chars().take(MAX_TEXT_CHARS).collect::<String>();
        s.push('…');
    }
    s
}

fn without_key(text: &str, key: &str, cut: bool) -> String {
    let key: Vec<char> = key.chars().collect();
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let run = chars[i..].iter().zip(&key).take_while(|(a, b)| a == b).count();
        if run >= MIN_KEY_PREFIX.min(key.len()) {
            out.push_str("[redacted]");
            i += run;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    if cut {
        // The text stopped mid-way: its last characters may be the start of the key.
        let tail = (1..MIN_KEY_PREFIX.min(key.len()))
            .rev()
            .find(|&n| out.chars().rev().take(n).eq(key[..n].iter().rev().copied()));
        if let Some(n) = tail {
            let keep = out.chars().count() - n;
            out = out.chars().take(keep).collect();
        }
    }
    out
}

/// The message of an OpenAI-style error object (`{"message": …, "code"|"type": …}`) or of a
/// bare string, unscrubbed: pass it through [`clean`].
pub(crate) fn error_text(err: &serde_json::Value) -> String {
    match err {
        serde_json::Value::String(s) => s.clone(),
        v => {
            let msg = match v.get("message") {
                Some(serde_json::Value::String(m)) => m.clone(),
                Some(other) if !other.is_null() => other.to_string(),
                _ => "(no message)".into(),
            };
            match v.get("code").filter(|c| !c.is_null()).or_else(|| v.get("type").filter(|t| !t.is_null())) {
                Some(serde_json::Value::String(code)) => format!("{msg} ({code})"),
                Some(code) => format!("{msg} ({code})"),
                None => msg,
            }
        }
    }
}

/// An error body as one clean line: the JSON error's message when the body is one (and was
/// read whole), else the body's text.
pub(crate) fn error_message(body: &str, key: Option<&str>, cut: bool) -> String {
    if !cut {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
            if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
                return clean(&error_text(e), key, false);
            }
        }
    }
    clean(body, key, cut)
}

/// The longest wait a retry hint may ask for; anything longer (or unparsable) is as good as
/// "not soon", and the caller falls back instead of waiting.
const MAX_HINT: Duration = Duration::from_secs(24 * 3600);

/// `retry-after-ms`, else `Retry-After` in seconds (an HTTP date is ignored: backoff applies).
/// Values that are not finite non-negative numbers are ignored; huge ones are clamped.
pub(crate) fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim).and_then(|v| v.parse::<f64>().ok());
    let seconds = get("retry-after-ms").map(|ms| ms / 1e3).or_else(|| get("retry-after"))?;
    hint(seconds)
}

/// A wait of `seconds`, when that is a finite non-negative number, at most [`MAX_HINT`].
fn hint(seconds: f64) -> Option<Duration> {
    if !(seconds.is_finite() && seconds >= 0.0) {
        return None;
    }
    Some(Duration::from_secs_f64(seconds.min(MAX_HINT.as_secs_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    const KEY: &str = "sk-RELTESTkey-0123456789abcdef";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_hints_that_are_not_sane_numbers_never_panic() {
        for bad in ["NaN", "-1", "inf", "-inf", "1e300", "99999999999999999999", "", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"] {
            for name in ["retry-after", "retry-after-ms"] {
                let d = retry_after(&headers(&[(name, bad)]));
                assert!(d.is_none_or(|d| d <= MAX_HINT), "{name}: {bad} gave {d:?}");
            }
        }
        assert_eq!(retry_after(&headers(&[("retry-after", "2")])), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&headers(&[("retry-after-ms", "250"), ("retry-after", "9")])), Some(Duration::from_millis(250)));
        assert_eq!(retry_after(&headers(&[("retry-after", "1e300")])), Some(MAX_HINT));
    }

    #[test]
    fn no_six_characters_of_the_key_survive_whatever_the_cut() {
        let filler = "x".repeat(MAX_TEXT_CHARS + 40);
        for at in 0..=filler.len() {
            let text = format!("invalid key {}{KEY} was sent {}", &filler[..at], &filler[at..]);
            let shown = clean(&text, Some(KEY), false);
            assert!(shown.chars().count() <= MAX_TEXT_CHARS + 1);
            assert_no_key_prefix(&shown);
            // The body itself cut inside the key, as a capped read leaves it.
            let cut_at = text.find(KEY).unwrap() + (at % KEY.len());
            assert_no_key_prefix(&clean(&text[..cut_at], Some(KEY), true));
        }
        assert_eq!(clean("bad key sk-RELTES****cdef", Some(KEY), false), "bad key [redacted]****cdef");
        assert_eq!(clean("no secret here", Some(KEY), false), "no secret here");
    }

    fn assert_no_key_prefix(s: &str) {
        for n in MIN_KEY_PREFIX..=KEY.len() {
            assert!(!s.contains(&KEY[..n]), "{:?} holds {:?}", s, &KEY[..n]);
        }
        // A cut text never ends in the key's start, however short.
        for n in 1..MIN_KEY_PREFIX {
            assert!(!s.ends_with(&KEY[..n]), "{s:?} ends in the key's start");
        }
    }

    #[test]
    fn error_bodies_become_one_short_line() {
        let json = format!(r#"{{"error": {{"message": "Incorrect API key {KEY}", "code": 401}}}}"#);
        assert_eq!(error_message(&json, Some(KEY), false), "Incorrect API key [redacted] (401)");
        let huge = format!(r#"{{"error": {{"message": "{}"}}}}"#, "y".repeat(5_000_000));
        assert!(error_message(&huge, None, false).chars().count() <= MAX_TEXT_CHARS + 1);
        assert_eq!(error_text(&serde_json::json!({"message": null, "type": "server_error"})), "(no message) (server_error)");
        assert_eq!(error_text(&serde_json::json!("plain")), "plain");
    }

    proptest::proptest! {
        #[test]
        fn no_six_characters_of_any_key_survive_any_text(pre in "\\PC{0,400}", post in "\\PC{0,40}", key in "[a-zA-Z0-9_-]{6,40}", cut in proptest::bool::ANY) {
            let text = format!("{pre}{key}{post}");
            let shown = clean(&text, Some(&key), cut);
            for n in MIN_KEY_PREFIX..=key.len() {
                proptest::prop_assert!(!shown.contains(&key[..n]), "{:?} holds {:?}", shown, &key[..n]);
            }
            proptest::prop_assert!(shown.chars().count() <= MAX_TEXT_CHARS + 1);
        }

        #[test]
        fn any_retry_hint_is_a_bounded_wait_or_none(value in "\\PC{0,30}") {
            if let Ok(v) = HeaderValue::from_str(&value) {
                for name in ["retry-after", "retry-after-ms"] {
                    let mut h = HeaderMap::new();
                    h.insert(name, v.clone());
                    proptest::prop_assert!(retry_after(&h).is_none_or(|d| d <= MAX_HINT));
                }
            }
        }
    }
}
