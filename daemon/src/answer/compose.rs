//! How an answer is composed: the opener from the device, then the cloud's continuation
//! through the seam, or, when the cloud fails or is off, the device finishing the sentence.
//! Every event goes out through one bounded channel; a reader that stops reading holds the
//! composition (and, through it, the cloud stream) instead of letting events pile up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::events::{Answer, AnswerEvent, AnswerTimings, Fallback, Source};
use super::request::AnswerRequest;
use super::source::OpenerSource;
use crate::cloud::{CloudClient, CloudError, CloudEvent, ContinuationRequest, Failure, Seam, SeamOutput};
use crate::engine::{Opener, OpenerEvent, OpenerOptions, Prompt, RequestError};

/// The most of the shown answer the device reads back when it finishes a sentence itself:
/// the end of the current sentence depends on the last words, and a bounded tail keeps the
/// prompt (and its cost) bounded however much the cloud sent.
const FINISH_TAIL_BYTES: usize = 1024;

/// The parts a composition uses.
pub(super) struct Parts {
    pub source: Arc<dyn OpenerSource>,
    pub cloud: Option<Arc<CloudClient>>,
    /// Cancelled when the daemon stops: a cancellation then means `ShuttingDown`.
    pub stopping: CancellationToken,
}

/// The reader went away: the composition stops.
struct Gone;

/// The sending end of an answer's events; sending waits while the reader is behind.
struct Out {
    tx: mpsc::Sender<AnswerEvent>,
    cancel: CancellationToken,
}

impl Out {
    async fn send(&self, ev: AnswerEvent) -> Result<(), Gone> {
        self.tx.send(ev).await.map_err(|_| {
            self.cancel.cancel();
            Gone
        })
    }
}

/// Produces one answer into `tx`, ending with exactly one `Done` or `Error` unless the reader
/// goes away first (which cancels the work).
pub(super) async fn compose(parts: Parts, req: AnswerRequest, tx: mpsc::Sender<AnswerEvent>, cancel: CancellationToken) {
    let out = Out { tx, cancel: cancel.clone() };
    let end = match compose_answer(&parts, &req, &out, &cancel).await {
        Ok(answer) => AnswerEvent::Done(Box::new(answer)),
        Err(Ended::Failed(RequestError::Cancelled)) if parts.stopping.is_cancelled() => AnswerEvent::Error(RequestError::ShuttingDown),
        Err(Ended::Failed(e)) => AnswerEvent::Error(e),
        Err(Ended::Gone) => return,
    };
    let _ = out.send(end).await;
}

enum Ended {
    Failed(RequestError),
    Gone,
}

impl From<Gone> for Ended {
    fn from(_: Gone) -> Self {
        Ended::Gone
    }
}

async fn compose_answer(parts: &Parts, req: &AnswerRequest, out: &Out, cancel: &CancellationToken) -> Result<Answer, Ended> {
    let cloud = parts.cloud.as_ref().filter(|_| req.use_cloud);
    if let Some(c) = cloud {
        let c = c.clone();
        tokio::spawn(async move { c.warm().await });
    }
    let opener = local(parts.source.as_ref(), &req.prompt, req.opener.clone(), req.arrived, out, cancel, |w| AnswerEvent::Word(w.clone())).await?;
    out.send(AnswerEvent::OpenerDone { text: opener.text.clone(), stop: opener.stop, timings: opener.timings.clone(), tokens: opener.generated_tokens }).await?;

    let mut c = Continued::default();
    let fallback = match cloud {
        None => Some(if req.use_cloud {
            Fallback { reason: "not_configured".into(), message: "no cloud endpoint is configured".into() }
        } else {
            Fallback { reason: "disabled".into(), message: "the request asked for no cloud".into() }
        }),
        Some(client) => continue_in_cloud(client, req, &opener, out, cancel, &mut c).await?,
    };

    let mut local_tokens = opener.generated_tokens;
    if fallback.is_some() {
        // Never leave a dangling half sentence: the device finishes the current one.
        let shown = format!("{}{}", opener.text, c.text);
        let prompt = Prompt { continue_from: Some(tail(&shown, FINISH_TAIL_BYTES).to_string()), ..req.prompt.clone() };
        let options = OpenerOptions { max_words: 40, max_tokens: 80, ..req.opener.clone() };
        let ends_open = shown.chars().last().is_some_and(|ch| ch.is_alphanumeric() || ch == ',');
        let mut first = true;
        let mut finish_text = String::new();
        let to_event = |w: &crate::engine::WordEvent| {
            let lead = if first && w.leading.is_empty() && ends_open { " " } else { w.leading.as_str() };
            first = false;
            let text = format!("{lead}{}", w.text);
            finish_text.push_str(&text);
            AnswerEvent::Delta { text, source: Source::Local }
        };
        match local(parts.source.as_ref(), &prompt, options, Instant::now(), out, cancel, to_event).await {
            Ok(o) => local_tokens += o.generated_tokens,
            Err(Ended::Failed(RequestError::Cancelled)) => return Err(Ended::Failed(RequestError::Cancelled)),
            Err(Ended::Failed(e)) => tracing::warn!(error = %e, "finishing the sentence locally failed"),
            Err(Ended::Gone) => return Err(Ended::Gone),
        }
        c.text.push_str(&finish_text);
    }

    Ok(Answer {
        text: format!("{}{}", opener.text, c.text),
        opener: opener.text,
        continuation: c.text,
        corrected: c.corrected,
        fallback,
        finish_reason: c.finish_reason.unwrap_or_else(|| "stop".into()),
        finish_detail: c.capped,
        timings: AnswerTimings {
            ttft_ms: ms(opener.timings.ttft),
            opener_ms: ms(opener.timings.opener),
            cloud_first_token_ms: c.first_token_ms,
            total_ms: ms(req.arrived.elapsed()),
        },
        prompt_tokens: opener.prompt_tokens,
        local_tokens,
        cloud_tokens: c.tokens,
    })
}

/// Runs one engine request, passing each word out as `event(word)`; returns the finished
/// opener. A client that goes away or cancels stops it.
async fn local(
    source: &dyn OpenerSource,
    prompt: &Prompt,
    options: OpenerOptions,
    arrived: Instant,
    out: &Out,
    cancel: &CancellationToken,
    mut event: impl FnMut(&crate::engine::WordEvent) -> AnswerEvent,
) -> Result<Opener, Ended> {
    let mut events = source.submit(prompt, options, arrived, cancel.child_token()).map_err(Ended::Failed)?;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return Err(Ended::Failed(RequestError::Cancelled)),
            ev = events.recv() => ev,
        };
        match ev {
            Some(OpenerEvent::Word(w)) => out.send(event(&w)).await?,
            Some(OpenerEvent::Done(o)) => return Ok(o),
            Some(OpenerEvent::Error(e)) => return Err(Ended::Failed(e)),
            None => return Err(Ended::Failed(RequestError::Inference("the engine dropped the request".into()))),
        }
    }
}

/// What the cloud added.
#[derive(Default)]
struct Continued {
    text: String,
    corrected: bool,
    first_token_ms: Option<f64>,
    tokens: Option<u64>,
    finish_reason: Option<String>,
    capped: Option<String>,
}

/// Streams the cloud's continuation out through the seam; returns why the device must
/// finish the answer, if it must.
async fn continue_in_cloud(
    client: &Arc<CloudClient>,
    req: &AnswerRequest,
    opener: &Opener,
    out: &Out,
    cancel: &CancellationToken,
    c: &mut Continued,
) -> Result<Option<Fallback>, Ended> {
    let opener_end = Instant::now();
    let mut seam = Seam::new(&opener.text);
    let ask = ContinuationRequest { query: req.prompt.query.clone(), opener: opener.text.clone(), mode: req.recovery };
    let mut stream = client.continuation(ask, cancel);
    let result = loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return Err(Ended::Failed(RequestError::Cancelled)),
            ev = stream.next() => ev,
        };
        match ev {
            Some(CloudEvent::Delta(d)) => emit(seam.push(&d), out, c, opener_end).await?,
            Some(CloudEvent::End(r)) => break r,
            None => break Err(Failure { error: CloudError::Internal("the continuation ended without its end".into()), forwarded: true, attempts: 0 }),
        }
    };
    emit(seam.flush(), out, c, opener_end).await?;
    match result {
        Ok(summary) => {
            c.tokens = summary.completion_tokens;
            c.finish_reason = summary.finish_reason.filter(|r| matches!(r.as_str(), "length" | "output_cap"));
            c.capped = summary.capped;
            if let Some(why) = &c.capped {
                tracing::warn!(cap = %why, "the cloud's continuation reached a cap; the answer ends with the text so far");
            }
            Ok(None)
        }
        Err(f) if f.error == CloudError::Cancelled || cancel.is_cancelled() => Err(Ended::Failed(RequestError::Cancelled)),
        Err(f) => {
            tracing::warn!(error = %f.error, attempts = f.attempts, "cloud continuation failed; finishing locally");
            Ok(Some(Fallback { reason: f.error.code().into(), message: f.error.to_string() }))
        }
    }
}

/// Everything the seam lets through goes out the same way, wherever it was read.
async fn emit(s: SeamOutput, out: &Out, c: &mut Continued, opener_end: Instant) -> Result<(), Gone> {
    if s.correction && !c.corrected {
        c.corrected = true;
        out.send(AnswerEvent::Correction).await?;
    }
    if !s.text.is_empty() {
        c.first_token_ms.get_or_insert_with(|| ms(opener_end.elapsed()));
        c.text.push_str(&s.text);
        out.send(AnswerEvent::Delta { text: s.text, source: Source::Cloud }).await?;
    }
    Ok(())
}

/// The last at most `max` bytes of `text`, starting at a word where it can.
fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let rest = &text[start..];
    match rest.find(char::is_whitespace) {
        Some(i) if i < rest.len() / 2 => rest[i..].trim_start(),
        _ => rest,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finish_reads_a_bounded_tail_from_a_word_start() {
        assert_eq!(tail("short text", 100), "short text");
        let long = format!("{} the last words.", "ä".repeat(2000));
        let t = tail(&long, 40);
        assert!(t.len() <= 40 && long.ends_with(t), "{t:?}");
        let words = "alpha beta gamma delta epsilon zeta";
        assert_eq!(tail(words, 14), "epsilon zeta");
    }
}
