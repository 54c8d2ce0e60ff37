//! How an answer is composed: the opener from the device, then the cloud's continuation
//! through the seam, or, when the cloud fails or is off, the device finishing the sentence.
//! A request without an opener (a tool result to read, structured output) goes to the cloud
//! as it is; should the cloud fail there, the device answers on its own where plain text is
//! acceptable. Every event goes out through one bounded channel; a reader that stops reading
//! holds the composition (and, through it, the cloud stream) instead of letting events pile up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::events::{Answer, AnswerEvent, AnswerTimings, Fallback, Source};
use super::memory::Conversations;
use super::request::AnswerRequest;
use super::source::OpenerSource;
use crate::cloud::{CloudClient, CloudError, CloudEvent, ContinuationRequest, Failure, Repair, Seam, SeamOutput, ToolCall};
use crate::engine::{Opener, OpenerEvent, OpenerOptions, Prompt, RequestError, WordEvent};

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
    /// Where the answer is remembered, for a request with a conversation id.
    pub memory: Option<(Arc<Conversations>, String)>,
}

/// The reader went away: the composition stops.
struct Gone;

/// The sending end of an answer's events; sending waits while the reader is behind. It
/// notes when the answer's first sentence has been shown.
struct Out {
    tx: mpsc::Sender<AnswerEvent>,
    cancel: CancellationToken,
    arrived: Instant,
    first_sentence: Option<Duration>,
}

impl Out {
    async fn send(&mut self, ev: AnswerEvent) -> Result<(), Gone> {
        if self.first_sentence.is_none() && shows_sentence_end(&ev) {
            self.first_sentence = Some(self.arrived.elapsed());
        }
        self.tx.send(ev).await.map_err(|_| {
            self.cancel.cancel();
            Gone
        })
    }
}

/// Whether `ev` shows the closing punctuation of a sentence: a word that ends one (words go
/// out only once the next has begun), or a delta with one before a space or at its end.
fn shows_sentence_end(ev: &AnswerEvent) -> bool {
    let ends = |t: &str| crate::engine::ends_sentence(t);
    match ev {
        AnswerEvent::Word(w) => ends(&w.text),
        AnswerEvent::Delta { text, .. } => ends(text) || text.split_whitespace().rev().skip(1).any(ends),
        _ => false,
    }
}

/// Produces one answer into `tx`, ending with exactly one `Done` or `Error` unless the reader
/// goes away first (which cancels the work).
pub(super) async fn compose(parts: Parts, req: AnswerRequest, tx: mpsc::Sender<AnswerEvent>, cancel: CancellationToken) {
    let mut out = Out { tx, cancel: cancel.clone(), arrived: req.arrived, first_sentence: None };
    let end = match compose_answer(&parts, &req, &mut out, &cancel).await {
        Ok(mut answer) => {
            answer.timings.first_sentence_ms = out.first_sentence.map(ms);
            if let Some((memory, id)) = &parts.memory {
                memory.remember(id, req.conversation.query(), &answer.text);
            }
            AnswerEvent::Done(Box::new(answer))
        }
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

async fn compose_answer(parts: &Parts, req: &AnswerRequest, out: &mut Out, cancel: &CancellationToken) -> Result<Answer, Ended> {
    let cloud = parts.cloud.as_ref().filter(|_| req.use_cloud);
    if let Some(c) = cloud {
        let c = c.clone();
        tokio::spawn(async move { c.warm().await });
    }
    let Some(options) = &req.opener else {
        return answer_without_opener(parts, req, cloud, out, cancel).await;
    };
    let prompt = req.conversation.prompt();
    let opener = local(parts.source.clone(), prompt.clone(), options.clone(), req.arrived, out, cancel, |w| AnswerEvent::Word(w.clone())).await?;
    out.send(AnswerEvent::OpenerDone { text: opener.text.clone(), stop: opener.stop, timings: opener.timings.clone(), tokens: opener.generated_tokens }).await?;

    let mut c = Continued::default();
    let fallback = match cloud {
        None => Some(if req.use_cloud {
            Fallback { reason: "not_configured".into(), message: "no cloud endpoint is configured".into() }
        } else {
            Fallback { reason: "disabled".into(), message: "the request asked for no cloud".into() }
        }),
        Some(client) => {
            let finisher = Finisher { parts, prompt: &prompt, options };
            continue_in_cloud(client, req, Some((&opener.text, finisher)), out, cancel, &mut c).await?
        }
    };
    let mut local_tokens = opener.generated_tokens + c.local_tokens;
    // The device finishes what the cloud left open: an answer the cloud never continued (one
    // sentence more when the opener ended one), or one that stops mid-sentence (cut by the
    // cloud's length limit, mulmd's cap or a fault, or just stopped on a colon).
    let cut = matches!(c.finish_reason.as_deref(), Some("length" | "output_cap")) || fallback.is_some();
    let open_end = !crate::engine::ends_sentence(&format!("{}{}", opener.text, c.text));
    if c.tool_calls.is_empty() && ((cut && c.text.is_empty()) || open_end) {
        let continued = c.text.len();
        let finisher = Finisher { parts, prompt: &prompt, options };
        local_tokens += finisher.finish(&opener.text, out, cancel, &mut c).await?;
        if continued > 0 && c.text.len() > continued {
            c.repairs.push(Repair::Finished);
        }
        close_sentence(&opener.text, out, &mut c).await?;
    }
    Ok(c.into_answer(opener, fallback, local_tokens, req.arrived))
}

/// The device's finish is bounded (40 words), and a list or a loop of words can outlast it:
/// then a full stop (after a word) or an ellipsis (after a comma or colon) ends what is heard,
/// so no answer stops mid-sentence. Marked as finished.
async fn close_sentence(opener: &str, out: &mut Out, c: &mut Continued) -> Result<(), Gone> {
    let shown = format!("{opener}{}", c.text);
    if crate::engine::ends_sentence(&shown) {
        return Ok(());
    }
    let Some(last) = shown.trim_end().chars().last() else { return Ok(()) };
    let text = if last.is_alphanumeric() || matches!(last, '"' | '\'' | '”' | '’' | ')' | '*' | '%' | '°') { "." } else { "…" };
    out.send(AnswerEvent::Delta { text: text.into(), source: Source::Local }).await?;
    c.text.push_str(text);
    if !c.repairs.contains(&Repair::Finished) {
        c.repairs.push(Repair::Finished);
    }
    Ok(())
}

/// A request the device does not open: the cloud answers the conversation as it is. When the
/// cloud is off or fails, the device answers in its stead (an opener finished to the end of
/// its sentence), unless the client asked for structured output it cannot give.
async fn answer_without_opener(parts: &Parts, req: &AnswerRequest, cloud: Option<&Arc<CloudClient>>, out: &mut Out, cancel: &CancellationToken) -> Result<Answer, Ended> {
    let mut c = Continued::default();
    let fallback = match cloud {
        Some(client) => continue_in_cloud(client, req, None, out, cancel, &mut c).await?,
        None => Some(Fallback { reason: "not_configured".into(), message: "no cloud endpoint is configured".into() }),
    };
    let Some(fallback) = fallback else {
        let mut answer = c.into_answer(Opener::empty(), None, 0, req.arrived);
        // The first text the client saw is the cloud's.
        answer.timings.ttft_ms = answer.timings.cloud_first_token_ms.unwrap_or_default();
        return Ok(answer);
    };
    if req.cloud_params.contains_key("response_format") || !c.text.is_empty() {
        return Err(Ended::Failed(RequestError::Upstream(format!("the cloud could not answer: {}", fallback.message))));
    }
    let prompt = req.conversation.prompt();
    let options = OpenerOptions::default();
    let opener = local(parts.source.clone(), prompt.clone(), options.clone(), req.arrived, out, cancel, |w| {
        AnswerEvent::Delta { text: if w.index == 0 { w.text.clone() } else { format!("{}{}", w.leading, w.text) }, source: Source::Local }
    })
    .await?;
    c.text = opener.text.clone();
    let mut local_tokens = opener.generated_tokens;
    local_tokens += Finisher { parts, prompt: &prompt, options: &options }.finish("", out, cancel, &mut c).await?;
    let mut answer = c.into_answer(Opener::empty(), Some(fallback), local_tokens, req.arrived);
    answer.timings.ttft_ms = ms(opener.timings.ttft);
    Ok(answer)
}

/// What the device needs to finish an answer's sentence itself.
struct Finisher<'a> {
    parts: &'a Parts,
    prompt: &'a Prompt,
    options: &'a OpenerOptions,
}

impl Finisher<'_> {
    /// The device finishes the sentence the answer (`opener` and what `c` holds so far)
    /// stopped in, adding its words to `c`; returns the tokens it wrote.
    async fn finish(&self, opener: &str, out: &mut Out, cancel: &CancellationToken, c: &mut Continued) -> Result<usize, Ended> {
        let shown = format!("{opener}{}", c.text);
        let prompt = Prompt { continue_from: Some(tail(&shown, FINISH_TAIL_BYTES).to_string()), ..self.prompt.clone() };
        let options = OpenerOptions { max_words: 40, max_tokens: 80, sentence_chars: None, ..self.options.clone() };
        let ends_open = shown.chars().last().is_some_and(|ch| ch.is_alphanumeric() || matches!(ch, ',' | '.' | '!' | '?' | ':' | ';'));
        let mut first = true;
        let mut finish_text = String::new();
        let to_event = |w: &WordEvent| {
            let lead = if first && w.leading.is_empty() && ends_open { " " } else { w.leading.as_str() };
            first = false;
            let text = format!("{lead}{}", w.text);
            finish_text.push_str(&text);
            AnswerEvent::Delta { text, source: Source::Local }
        };
        let tokens = match local(self.parts.source.clone(), prompt, options, Instant::now(), out, cancel, to_event).await {
            Ok(o) => o.generated_tokens,
            Err(Ended::Failed(RequestError::Cancelled)) => return Err(Ended::Failed(RequestError::Cancelled)),
            Err(Ended::Failed(e)) => {
                tracing::warn!(error = %e, "finishing the sentence locally failed");
                0
            }
            Err(Ended::Gone) => return Err(Ended::Gone),
        };
        c.text.push_str(&finish_text);
        Ok(tokens)
    }
}

/// Runs one engine request, passing each word out as `event(word)`; returns the finished
/// opener. Tokenizing a long conversation takes milliseconds, so it runs off the reactor. A
/// client that goes away or cancels stops it.
async fn local(
    source: Arc<dyn OpenerSource>,
    prompt: Prompt,
    options: OpenerOptions,
    arrived: Instant,
    out: &mut Out,
    cancel: &CancellationToken,
    mut event: impl FnMut(&WordEvent) -> AnswerEvent,
) -> Result<Opener, Ended> {
    let token = cancel.child_token();
    let submitted = tokio::task::spawn_blocking(move || source.submit(&prompt, options, arrived, token)).await;
    let mut events = match submitted {
        Ok(r) => r.map_err(Ended::Failed)?,
        Err(e) => return Err(Ended::Failed(RequestError::Inference(format!("internal error in the opener source: {e}")))),
    };
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

/// What the cloud (and any local finish) added.
#[derive(Default)]
struct Continued {
    text: String,
    corrected: bool,
    first_token_ms: Option<f64>,
    tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    finish_reason: Option<String>,
    capped: Option<String>,
    tool_calls: Vec<ToolCall>,
    /// What the seam (and the ending) repaired.
    repairs: Vec<Repair>,
    /// Tokens the device wrote inside the continuation (a restart's clause).
    local_tokens: usize,
}

impl Continued {
    fn into_answer(self, opener: Opener, fallback: Option<Fallback>, local_tokens: usize, arrived: Instant) -> Answer {
        Answer {
            text: format!("{}{}", opener.text, self.text),
            opener: opener.text,
            continuation: self.text,
            corrected: self.corrected,
            fallback,
            finish_reason: self.finish_reason.unwrap_or_else(|| "stop".into()),
            finish_detail: self.capped,
            timings: AnswerTimings {
                ttft_ms: ms(opener.timings.ttft),
                opener_ms: ms(opener.timings.opener),
                cloud_first_token_ms: self.first_token_ms,
                first_sentence_ms: None,
                total_ms: ms(arrived.elapsed()),
            },
            prompt_tokens: opener.prompt_tokens,
            reused_prompt_tokens: opener.reused_tokens,
            local_tokens,
            cloud_tokens: self.tokens,
            cloud_prompt_tokens: self.prompt_tokens,
            tool_calls: self.tool_calls,
            repairs: self.repairs,
        }
    }
}

/// Streams the cloud's answer out (through the seam when it continues an opener, whose
/// `Finisher` finishes the opener's clause when the cloud starts a new sentence instead);
/// returns why the device must finish the answer, if it must.
async fn continue_in_cloud(
    client: &Arc<CloudClient>,
    req: &AnswerRequest,
    opener: Option<(&str, Finisher<'_>)>,
    out: &mut Out,
    cancel: &CancellationToken,
    c: &mut Continued,
) -> Result<Option<Fallback>, Ended> {
    let asked = Instant::now();
    let mut seam = opener.as_ref().map(|(text, _)| Seam::new(text));
    let ask = ContinuationRequest {
        messages: req.conversation.to_cloud(),
        opener: opener.as_ref().map(|(text, _)| text.to_string()),
        mode: req.recovery,
        params: req.cloud_params.clone(),
    };
    let mut stream = client.continuation(ask, cancel);
    let result = loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return Err(Ended::Failed(RequestError::Cancelled)),
            ev = stream.next() => ev,
        };
        match ev {
            Some(CloudEvent::Delta(d)) => {
                let passed = match seam.as_mut() {
                    Some(s) => s.push(&d),
                    None => SeamOutput { text: d, ..Default::default() },
                };
                emit(passed, opener.as_ref(), out, c, cancel, asked).await?
            }
            Some(CloudEvent::End(r)) => break r,
            None => break Err(Failure { error: CloudError::Internal("the continuation ended without its end".into()), forwarded: true, attempts: 0 }),
        }
    };
    if let Some(s) = seam.as_mut() {
        emit(s.flush(), opener.as_ref(), out, c, cancel, asked).await?;
    }
    match result {
        Ok(summary) => {
            c.tokens = summary.completion_tokens;
            c.prompt_tokens = summary.prompt_tokens;
            c.finish_reason = summary.finish_reason.filter(|r| matches!(r.as_str(), "length" | "output_cap" | "tool_calls"));
            c.capped = summary.capped;
            if let Some(why) = &c.capped {
                tracing::warn!(cap = %why, "the cloud's continuation reached a cap; the device finishes the sentence");
            }
            if !summary.tool_calls.is_empty() {
                c.finish_reason = Some("tool_calls".into());
                c.tool_calls = summary.tool_calls.clone();
                out.send(AnswerEvent::ToolCalls(summary.tool_calls)).await?;
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

/// Everything the seam lets through goes out the same way, wherever it was read. A restart
/// has the device finish the opener's clause before the cloud's new sentence.
async fn emit(
    s: SeamOutput,
    opener: Option<&(&str, Finisher<'_>)>,
    out: &mut Out,
    c: &mut Continued,
    cancel: &CancellationToken,
    asked: Instant,
) -> Result<(), Ended> {
    c.repairs.extend(&s.repairs);
    if s.correction && !c.corrected {
        c.corrected = true;
        out.send(AnswerEvent::Correction).await?;
    }
    if s.finish_first {
        if let Some((text, finisher)) = opener {
            c.local_tokens += finisher.finish(text, out, cancel, c).await?;
        }
    }
    if !s.text.is_empty() {
        c.first_token_ms.get_or_insert_with(|| ms(asked.elapsed()));
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

    #[test]
    fn a_sentence_ends_at_closing_punctuation_shown_whole() {
        let delta = |t: &str| AnswerEvent::Delta { text: t.into(), source: Source::Cloud };
        assert!(shows_sentence_end(&delta(" nine minutes. Then")));
        assert!(shows_sentence_end(&delta(" done!")));
        assert!(!shows_sentence_end(&delta(" about 3.5 litres of")));
        let word = |t: &str| AnswerEvent::Word(WordEvent { index: 3, text: t.into(), leading: " ".into(), at: Duration::ZERO });
        assert!(shows_sentence_end(&word("minutes.")) && !shows_sentence_end(&word("minutes,")));
    }
}
