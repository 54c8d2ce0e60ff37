//! Joining the cloud's continuation to the opener so the two read as one answer. The start of
//! the continuation is held back until the seam can tell what it is, then repaired where a
//! listener would notice the join:
//!
//! - the correction marker is lifted out wherever it comes (and reported);
//! - an echo of mulmd's own prompt (its tags or labels), or a parenthesis at the start that
//!   talks about its rules, is dropped;
//! - a restated opener is dropped: the continuation's start matches the opener's start with
//!   case, punctuation and spacing ignored, for 3 words or most of the opener, possibly after
//!   a short lead-in ("Sure, …", "You're right, …") or without the opener's own ("Yes, …");
//!   a restatement that then goes its own way is dropped to the end of its sentence, and the
//!   answer goes on as after a restart;
//! - a restart (the opener stopped inside a sentence, mid-clause or after a comma, and the
//!   continuation begins a new one) is
//!   reported, so the device can finish the clause before the cloud's sentence is shown; after
//!   a correction, the redirect follows a dash instead ("…eat grapes — actually, …");
//! - spacing at the join is made right.
//!
//! Every repair is reported ([`Repair`]) for the answer's record and the metrics.

use serde::Serialize;

use super::prompt::CORRECTION_MARKER;
use crate::engine::ends_sentence;

/// A repair made at the seam (or at the end of the answer, for [`Repair::Finished`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Repair {
    /// The continuation restated the opener; the restatement was dropped.
    Restated,
    /// The continuation echoed mulmd's prompt; the echo was dropped.
    Scaffold,
    /// The opener stopped inside a sentence and the continuation began a new one: the device
    /// finished the opener's sentence first.
    Restart,
    /// The continuation was cut short (its length limit, mulmd's cap, a fault): the device
    /// finished its sentence.
    Finished,
}

impl Repair {
    /// The name in events, logs and the `kind` label of `mulmd_seam_repairs_total`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Restated => "restated",
            Self::Scaffold => "scaffold",
            Self::Restart => "restart",
            Self::Finished => "finished",
        }
    }
}

/// What the seam lets through for one delta.
#[derive(Debug, Default, PartialEq)]
pub struct SeamOutput {
    /// Text to show after what was shown before.
    pub text: String,
    /// The continuation began with the correction marker.
    pub correction: bool,
    /// The device should finish the opener's clause before `text` is shown (a restart).
    pub finish_first: bool,
    /// Repairs made in this output.
    pub repairs: Vec<Repair>,
}

/// Labels and tags of mulmd's prompts (this one's and earlier layouts'), lower-case, as a
/// continuation that echoes them begins.
const SCAFFOLD: &[&str] = &[
    "the user asked",
    "user asked:",
    "the reply so far",
    "reply so far",
    "<opening",
    "<question",
    "opening:",
    "continuation:",
    "(begin your reply with",
    "begin your reply with:",
];

/// Words of the continuation rules: a parenthesis at the continuation's start that holds one
/// is the model talking about its instructions, not answering.
const RULE_TALK: &[&str] = &["opening", "marker", "word for word", "continuation", "listener", "joke", "redirect"];

/// Words that may come before a restatement ("Sure, …", "You're right, …").
const LEAD_IN: &[&str] = &[
    "sure", "yes", "yeah", "okay", "ok", "of", "course", "certainly", "absolutely", "well", "right", "you're", "youre", "you", "are",
    "great", "good", "question", "so", "alright", "indeed", "no", "problem", "happy", "to", "help", "here", "is", "the", "answer",
];
/// At most this many lead-in words.
const MAX_LEAD_IN: usize = 4;
/// At most this many words of a remark before a quoted restatement ("Here's a revised version
/// of the answer: \"…").
const MAX_COMMENTARY: usize = 12;
/// How remarks about the answer begin (one word, or "a"/"the" and one of these: "The answer
/// to your question is: …").
const COMMENTARY: &[&str] = &["answer", "here", "here's", "heres", "below", "revised", "corrected", "updated", "continued", "continuing", "rewritten", "complete"];

/// Words a new sentence begins with; a continuation that begins with one after an opener cut
/// inside a sentence is starting over rather than going on.
const STARTERS: &[&str] = &[
    "The", "A", "An", "It", "It's", "Its", "This", "That", "These", "Those", "There", "Here", "You", "Your", "You're", "To", "In", "If", "When",
    "While", "For", "Most", "Many", "Some", "We", "They", "He", "She", "As", "Yes", "No", "Sure", "First", "Firstly", "Finally", "However",
    "Also", "Additionally", "So", "Certainly", "Absolutely", "Great", "Well", "One", "Another", "Generally", "Typically", "Removing",
    "Actually", "Oops", "Wait", "Sorry", "Correction", "Oh",
];

/// Holding more than this many bytes decides whatever is undecided (a bound on the delay).
const MAX_HELD: usize = 2000;

/// The seam of one answer: fed the continuation's deltas in order ([`Seam::push`]) and told
/// when the stream ends ([`Seam::flush`]); what it returns is what the listener gets.
pub struct Seam {
    opener: String,
    /// The opener's words, compared with case and punctuation ignored.
    words: Vec<String>,
    /// How many of them are a lead-in ("Yes,", "Sure!") a restatement may leave out.
    opener_lead_in: usize,
    /// The opener stops inside a sentence (mid-clause, or after a comma that leads on).
    mid_sentence: bool,
    held: String,
    decided: bool,
    /// The start was checked for a restatement (it is checked once).
    restatement_checked: bool,
    /// A dropped restatement repeated the whole opener: what follows goes on from it.
    went_on: bool,
    /// A dropped restatement ended a sentence: what follows begins a new one.
    new_sentence: bool,
    /// After the decision: text that may be the start of a correction marker.
    marker_tail: String,
    correction: bool,
    repairs: Vec<Repair>,
}

/// A word as compared: lower-case, punctuation trimmed from both ends.
fn norm(w: &str) -> String {
    w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase()
}


impl Seam {
    pub fn new(opener: &str) -> Self {
        let opener = opener.trim_end().to_string();
        let raw: Vec<&str> = opener.split_whitespace().filter(|w| !norm(w).is_empty()).collect();
        let words = raw.iter().map(|w| norm(w)).collect();
        Self {
            mid_sentence: !opener.is_empty() && !ends_sentence(&opener),
            opener_lead_in: lead_in_len(&raw),
            opener,
            words,
            held: String::new(),
            decided: false,
            restatement_checked: false,
            went_on: false,
            new_sentence: false,
            marker_tail: String::new(),
            correction: false,
            repairs: Vec::new(),
        }
    }

    /// Feeds a delta; returns what may be shown now.
    pub fn push(&mut self, delta: &str) -> SeamOutput {
        if self.decided {
            return self.pass(delta, false);
        }
        self.held.push_str(delta);
        self.decide(false).unwrap_or_default()
    }

    /// The stream ended: release whatever is held.
    pub fn flush(&mut self) -> SeamOutput {
        if self.decided {
            return self.pass("", true);
        }
        self.decide(true).unwrap_or_default()
    }

    /// After the decision, text passes as it comes, but for a correction marker written later
    /// than the start (small models do), which is lifted out too; a piece of text that may be
    /// the marker's beginning waits for the next delta.
    fn pass(&mut self, delta: &str, end: bool) -> SeamOutput {
        self.marker_tail.push_str(delta);
        let mut correction = false;
        while let Some(i) = self.marker_tail.find(CORRECTION_MARKER) {
            correction = true;
            let mut after = i + CORRECTION_MARKER.len();
            // "done. [[redirect]] Actually" keeps one space, not two.
            if self.marker_tail[..i].ends_with(' ') && self.marker_tail[after..].starts_with(' ') {
                after += 1;
            }
            self.marker_tail.replace_range(i..after, "");
        }
        let keep = match marker_prefix_len(&self.marker_tail) {
            0 => 0,
            _ if end => 0,
            // The space before a possible marker waits with it, to be dropped with it.
            n => {
                let before = &self.marker_tail[..self.marker_tail.len() - n];
                n + before.len() - before.trim_end_matches(' ').len()
            }
        };
        let text = self.marker_tail[..self.marker_tail.len() - keep].to_string();
        self.marker_tail.drain(..self.marker_tail.len() - keep);
        SeamOutput { text, correction, ..Default::default() }
    }

    /// Works through the held text; None while it cannot tell yet (and `end` is false).
    fn decide(&mut self, end: bool) -> Option<SeamOutput> {
        let end = end || self.held.len() > MAX_HELD;
        loop {
            let start = self.held.trim_start();
            if start.is_empty() {
                let held = std::mem::take(&mut self.held);
                return self.release(end, held, false);
            }
            // The correction marker.
            if let Some(rest) = start.strip_prefix(CORRECTION_MARKER) {
                self.correction = true;
                self.held = rest.to_string();
                continue;
            }
            if !end && CORRECTION_MARKER.starts_with(start) {
                return None;
            }
            // An echo of the prompt.
            let lower = start.to_lowercase();
            if let Some(label) = SCAFFOLD.iter().find(|l| lower.starts_with(**l)) {
                let Some(cut) = self.scaffold_end(label, end) else { return None };
                self.repairs.push(Repair::Scaffold);
                self.held = self.held.trim_start()[cut..].to_string();
                continue;
            }
            if !end && SCAFFOLD.iter().any(|l| l.starts_with(&lower)) {
                return None;
            }
            // A stage direction about the rules: "(Also, avoid quoting the opening, …)".
            if start.starts_with('(') {
                match start.find(')') {
                    Some(close) if RULE_TALK.iter().any(|w| lower[..close].contains(w)) => {
                        self.repairs.push(Repair::Scaffold);
                        self.held = start[close + 1..].to_string();
                        continue;
                    }
                    None if !end && start.len() < MAX_HELD => return None,
                    _ => {}
                }
            }
            if self.restatement_checked {
                break;
            }
            // A restated opener; the marker or an echo may follow it, so the loop goes on.
            let start = start.to_string();
            match self.restatement(&start, end) {
                Restatement::Undecided => return None,
                Restatement::Whole(cut) => {
                    let restated_ends = ends_sentence(&start[..cut]);
                    let rest = start[cut..].trim_start();
                    if !self.mid_sentence && !restated_ends && !end && rest.is_empty() {
                        return None; // after an opener that ended its sentence: see what follows
                    }
                    if !self.mid_sentence && !restated_ends && rest.starts_with(char::is_lowercase) {
                        // "The dreaded dripping tap." then "You're right, the dreaded dripping
                        // tap is a classic…": the restatement is the subject of a sentence of
                        // its own, which goes.
                        let Some(sentence_end) = self.sentence_end(&start, cut, end) else { return None };
                        self.repairs.push(Repair::Restated);
                        self.new_sentence = true;
                        self.held = start[sentence_end..].to_string();
                    } else {
                        // What follows goes on from the opener's words, or (when the
                        // restatement ended a sentence) begins a new one.
                        self.repairs.push(Repair::Restated);
                        self.went_on = !restated_ends;
                        self.new_sentence = restated_ends;
                        self.held = start[cut..].to_string();
                    }
                }
                Restatement::Diverged(last_word) => {
                    // The cloud started the answer over in its own words: its first sentence
                    // goes (it may end at the last word that matched); what follows is a new
                    // sentence after the opener.
                    let Some(sentence_end) = self.sentence_end(&start, last_word, end) else { return None };
                    self.repairs.push(Repair::Restated);
                    self.new_sentence = true;
                    self.held = start[sentence_end..].to_string();
                }
                Restatement::None => {}
            }
            self.restatement_checked = true;
        }
        let start = self.held.trim_start();
        let sentence = self.new_sentence || starts_sentence(start);
        if self.correction && self.mid_sentence && (sentence || start.starts_with(char::is_uppercase)) {
            // A redirect of a wrong opener cut inside a sentence: a spoken dash, rather than the
            // device finishing a clause that is wrong.
            let text = format!("— {}", lower_starter(start));
            self.held.clear();
            return self.release(end, text, false);
        }
        let restart = self.mid_sentence && !self.went_on && sentence;
        // Untrimmed: a continuation that opens with a line break keeps it.
        let held = std::mem::take(&mut self.held);
        self.release(end, held, restart)
    }

    /// The byte after the end of the sentence in `start` that goes on at `from`; at the end
    /// of the stream, the end of the text. None while it has not ended yet.
    fn sentence_end(&self, start: &str, from: usize, end: bool) -> Option<usize> {
        first_sentence_end(&start[from..]).map(|e| from + e).or(end.then_some(start.len()))
    }

    /// Where the echoed scaffold starting with `label` ends, in the trimmed held text: through
    /// a closing tag, else through the opener's text when the echo repeats it, else through
    /// the first blank line. None while none of these is in sight yet.
    fn scaffold_end(&self, label: &str, end: bool) -> Option<usize> {
        let start = self.held.trim_start();
        if let Some(tag) = label.strip_prefix('<') {
            let close = format!("</{tag}>");
            if let Some(i) = start.to_lowercase().find(&close) {
                return Some(i + close.len());
            }
        }
        if !self.opener.is_empty() {
            if let Some(i) = start.rfind(&self.opener) {
                return Some(i + self.opener.len());
            }
        }
        if let Some(i) = start.find("\n\n") {
            return Some(i + 2);
        }
        end.then(|| start.find('\n').map_or(start.len(), |i| i + 1))
    }

    /// Whether `text` (trimmed) begins by restating the opener: its words, case and
    /// punctuation ignored, after at most a short lead-in, from the opener's first word or
    /// from the first after its own lead-in.
    fn restatement(&self, text: &str, end: bool) -> Restatement {
        if self.words.is_empty() {
            return Restatement::None;
        }
        // Words with where each ends in `text`; a last word still being written is left out.
        let mut words: Vec<(String, String, usize)> = Vec::new();
        let mut at = 0;
        for raw in text.split_whitespace() {
            let i = text[at..].find(raw).map_or(at, |i| at + i);
            at = i + raw.len();
            words.push((raw.to_string(), norm(raw), at));
        }
        if !end && !text.ends_with(char::is_whitespace) {
            words.pop();
        }
        let mut undecided = false;
        // From the opener's first word, from the first after its own lead-in, and (for an
        // opener of 4 words or more) from its second: "To remove a stain, …" comes back as
        // "Remove a stain, …".
        let mut starts = vec![(0, true), (self.opener_lead_in, true)];
        if self.words.len() >= 4 {
            starts.push((1, false));
        }
        starts.retain(|&(k, _)| k < self.words.len());
        starts.dedup_by_key(|s| s.0);
        for (skip, loose) in starts {
            match self.restatement_from(&words, &self.words[skip..], end, loose) {
                Restatement::None => {}
                Restatement::Undecided => undecided = true,
                found => return found,
            }
        }
        if undecided {
            Restatement::Undecided
        } else {
            Restatement::None
        }
    }

    /// [`Self::restatement`] of the opener's words `opener` by the continuation's `words`
    /// (raw, normalised, end byte). `loose` also takes most of a short opener (60%) where 3
    /// words are not there.
    fn restatement_from(&self, words: &[(String, String, usize)], opener: &[String], end: bool, loose: bool) -> Restatement {
        let need = if loose { opener.len().min(3) } else { 3 };
        let mut undecided = false;
        let commentary = commentary_start(words);
        for lead in 0..=MAX_COMMENTARY.min(words.len()) {
            // A lead-in is a few stock words closed by punctuation ("Sure,", "You're right,"),
            // or a remark closed by a colon ("Here's the rest of the answer:").
            if lead > 0 {
                let stock = lead <= MAX_LEAD_IN && words[..lead].iter().all(|(_, n, _)| LEAD_IN.contains(&n.as_str()));
                let closed = closes(&words[lead - 1].0);
                let remark = commentary && words[lead - 1].0.ends_with(':');
                if !(stock && closed) && !remark {
                    continue;
                }
            }
            let matched = words[lead..].iter().zip(opener).take_while(|((_, n, _), w)| n == *w).count();
            let available = words.len() - lead;
            if matched >= need || (loose && matched > 0 && matched * 10 >= opener.len() * 6) {
                if matched == opener.len() {
                    return Restatement::Whole(words[lead + matched - 1].2);
                }
                if matched == available && !end {
                    undecided = true; // it may yet restate the whole opener
                    continue;
                }
                let (raw, _, word_end) = &words[lead + matched - 1];
                return Restatement::Diverged(word_end - raw.len());
            }
            if matched == available && !end {
                undecided = true; // too few words yet to tell
            }
        }
        // A remark still short of its colon, or stock words still short of their comma
        // ("You're right"), may yet lead into a restatement.
        let open_remark = commentary && words.len() < MAX_COMMENTARY && !words.iter().any(|(raw, _, _)| raw.ends_with(':'));
        let open_lead_in = words.len() < MAX_LEAD_IN && words.iter().all(|(raw, n, _)| LEAD_IN.contains(&n.as_str()) && !closes(raw));
        if undecided || ((open_remark || open_lead_in) && !end) {
            Restatement::Undecided
        } else {
            Restatement::None
        }
    }

    /// Decides: `text` goes out (after the marker, with the join's spacing), with the repairs
    /// made. With `restart`, the device finishes the opener's clause first.
    fn release(&mut self, end: bool, text: String, restart: bool) -> Option<SeamOutput> {
        if text.trim().is_empty() && !end {
            // Nothing but repairs so far: wait for the text they leave.
            self.held = text;
            return None;
        }
        self.decided = true;
        self.held.clear();
        let mut repairs = std::mem::take(&mut self.repairs);
        if restart {
            repairs.push(Repair::Restart);
        }
        let text = if restart { new_sentence_spacing(&text) } else { join_spacing(&self.opener, &text) };
        Some(SeamOutput { text, correction: self.correction, finish_first: restart, repairs })
    }
}

enum Restatement {
    /// Too little text yet to tell.
    Undecided,
    /// Not a restatement.
    None,
    /// The whole opener restated, through this byte of the text.
    Whole(usize),
    /// The opener's start restated, then something else; the last word that matched begins
    /// at this byte of the text.
    Diverged(usize),
}

/// Whether the continuation's words begin a remark about the answer ("Here's…", "A revised
/// version…").
fn commentary_start(words: &[(String, String, usize)]) -> bool {
    let is = |i: usize| words.get(i).is_some_and(|(_, n, _)| COMMENTARY.contains(&n.as_str()));
    is(0) || (words.first().is_some_and(|(_, n, _)| n == "a" || n == "the") && is(1))
}

/// How many of `words` open with a lead-in: a few stock words closed by punctuation
/// ("Yes,", "Sure!", "Of course,"); 0 if none.
fn lead_in_len(words: &[&str]) -> usize {
    for (i, w) in words.iter().take(MAX_LEAD_IN).enumerate() {
        if !LEAD_IN.contains(&norm(w).as_str()) {
            return 0;
        }
        if closes(w) {
            return i + 1;
        }
    }
    0
}

/// Whether a lead-in word closes the lead-in ("Sure,", "right!").
fn closes(word: &str) -> bool {
    word.ends_with([',', '.', '!', ':', ';', '—'])
}

/// The length of the longest end of `text` that is a beginning of the correction marker.
fn marker_prefix_len(text: &str) -> usize {
    (1..CORRECTION_MARKER.len().min(text.len() + 1)).rev().find(|&n| text.is_char_boundary(text.len() - n) && CORRECTION_MARKER.starts_with(&text[text.len() - n..])).unwrap_or(0)
}

/// Whether `text` begins a new sentence: a capitalised word that sentences begin with.
fn starts_sentence(text: &str) -> bool {
    let first = text.split_whitespace().next().unwrap_or("");
    let word = first.trim_end_matches(|c: char| !c.is_alphanumeric() && c != '\'');
    STARTERS.contains(&word)
}

/// `text` with its first word lower-cased when it is a sentence starter ("Actually, …"), to
/// follow a dash; names keep their capital.
fn lower_starter(text: &str) -> String {
    if !starts_sentence(text) || text.starts_with("I ") || text.starts_with("I'") {
        return text.to_string();
    }
    let mut chars = text.chars();
    chars.next().map(|c| c.to_lowercase().chain(chars).collect()).unwrap_or_default()
}

/// The byte after the first sentence's end in `text` (its closing punctuation and any closing
/// quote), if a sentence ends there.
fn first_sentence_end(text: &str) -> Option<usize> {
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if matches!(c, '.' | '!' | '?' | '…') {
            let mut j = i + c.len_utf8();
            while let Some(&(k, q)) = chars.peek() {
                if matches!(q, '"' | '\'' | '”' | '’' | ')') {
                    j = k + q.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            if text[j..].chars().next().is_none_or(char::is_whitespace) {
                return Some(j);
            }
        }
    }
    None
}

/// One space between the opener's last word and a new word; none before punctuation.
fn join_spacing(opener: &str, text: &str) -> String {
    let trimmed = text.trim_start_matches([' ', '\t']);
    let Some(first) = trimmed.chars().next() else { return String::new() };
    if opener.is_empty() || trimmed.starts_with(['\n', '\r']) {
        return trimmed.to_string();
    }
    if first.is_alphanumeric() || matches!(first, '(' | '"' | '“' | '\'' | '-' | '–' | '—' | '*') {
        format!(" {trimmed}")
    } else {
        trimmed.to_string()
    }
}

/// Text that begins a new sentence after a finished one: one space before it.
fn new_sentence_spacing(text: &str) -> String {
    let trimmed = text.trim_start_matches([' ', '\t']);
    if trimmed.is_empty() || trimmed.starts_with(['\n', '\r']) {
        trimmed.to_string()
    } else {
        format!(" {trimmed}")
    }
}

#[cfg(test)]
mod tests;
