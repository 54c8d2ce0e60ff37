//! Where an opener's words begin and end, and where it should stop.
//!
//! Text arrives in pieces (one detokenized token at a time). A word is complete when
//! whitespace follows it, so it is emitted the moment the token after it starts a new word (or
//! the generation ends). The opener stops after `max_words`, or earlier, once `min_words` are
//! out, at the first clause boundary: a word ending in clause punctuation, or a line break.

/// One finished word and the whitespace that preceded it in the generated text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    pub leading: String,
    pub text: String,
}

/// Why the opener ended where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `max_words` words were written.
    WordBudget,
    /// At least `min_words` were written and the last one closed a clause.
    ClauseBoundary,
    /// The model ended its answer (end-of-turn or another special token).
    EndOfText,
    /// The token cap was reached before the word budget.
    TokenCap,
    /// The model's context is full.
    ContextFull,
    /// Finishing a sentence: it has ended.
    SentenceEnd,
}

/// Characters that close a clause when they end a word.
const CLAUSE_END: &[char] = &['.', ',', ';', ':', '!', '?', '…', '—', ')'];
/// Characters that close a sentence when they end a word (possibly before a closing quote).
pub const SENTENCE_END: &[char] = &['.', '!', '?', '…'];

/// True when `text` already ends a sentence.
pub fn ends_sentence(text: &str) -> bool {
    text.trim_end().trim_end_matches(['"', '\'', '”', '’', ')']).ends_with(SENTENCE_END)
}

/// Where an opener may stop (besides `max_words`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// At the first clause boundary once `min_words` are out (the paper's opener).
    Clause { min_words: usize },
    /// At the end of the current sentence (finishing an answer).
    SentenceEnd,
    /// At the first sentence end once `min_chars` characters are out: a whole first sentence
    /// long enough for a voice pipeline to start speaking on it.
    Voice { min_chars: usize },
}

/// Whether a sentence may stop after `word`: it ends one, or a line break follows it; but not
/// at a list's number ("1.") nor at a colon that leads into what follows (a list, a quote).
fn sentence_stop(word: &str, next_break: bool) -> bool {
    let list_marker = word.len() <= 4 && word.trim_end_matches(['.', ')']).chars().all(|c| c.is_ascii_digit()) && word.len() > 1;
    if list_marker || word.ends_with(':') {
        return false;
    }
    ends_sentence(word) || next_break
}

/// Splits streamed text into words and decides when to stop.
#[derive(Debug)]
pub struct WordSplitter {
    until: Until,
    max_words: usize,
    pending: String,
    emitted: usize,
    /// Characters emitted so far, separators included.
    chars: usize,
}

impl WordSplitter {
    /// `1 <= min_words <= max_words` is the caller's contract (options are validated first).
    pub fn new(min_words: usize, max_words: usize) -> Self {
        debug_assert!(1 <= min_words && min_words <= max_words);
        Self { until: Until::Clause { min_words }, max_words, pending: String::new(), emitted: 0, chars: 0 }
    }

    /// A splitter that runs to the end of the current sentence (at most `max_words` words).
    pub fn to_sentence_end(max_words: usize) -> Self {
        Self { until: Until::SentenceEnd, ..Self::new(1, max_words.max(1)) }
    }

    /// A splitter that stops at the first sentence end after `min_chars` characters (at most
    /// `max_words` words).
    pub fn voice(min_chars: usize, max_words: usize) -> Self {
        Self { until: Until::Voice { min_chars }, ..Self::new(1, max_words.max(1)) }
    }

    /// Adds text; calls `on_word` for every word this completes. Returns a stop reason when the
    /// opener is finished (the caller then discards anything after the last word).
    pub fn push(&mut self, text: &str, mut on_word: impl FnMut(Word)) -> Option<StopReason> {
        self.pending.push_str(text);
        loop {
            let start = match self.pending.find(|c: char| !c.is_whitespace()) {
                Some(i) => i,
                None => return None,
            };
            let Some(len) = self.pending[start..].find(char::is_whitespace) else {
                return None;
            };
            let end = start + len;
            let word = Word {
                leading: self.pending[..start].to_string(),
                text: self.pending[start..end].to_string(),
            };
            let next_break = self.pending[end..].chars().take_while(|c| c.is_whitespace()).any(|c| c == '\n');
            self.pending.drain(..end);
            self.emitted += 1;
            if self.emitted > 1 {
                self.chars += word.leading.chars().count();
            }
            self.chars += word.text.chars().count();
            let stop = match self.until {
                Until::Clause { min_words } => {
                    (self.emitted >= min_words && (word.text.ends_with(CLAUSE_END) || next_break)).then_some(StopReason::ClauseBoundary)
                }
                Until::SentenceEnd => sentence_stop(&word.text, next_break).then_some(StopReason::SentenceEnd),
                Until::Voice { min_chars } => (self.chars >= min_chars && sentence_stop(&word.text, next_break)).then_some(StopReason::SentenceEnd),
            };
            on_word(word);
            if let Some(stop) = stop {
                return Some(stop);
            }
            if self.emitted >= self.max_words {
                return Some(StopReason::WordBudget);
            }
        }
    }

    /// The generation ended: the trailing word, if any, is complete.
    pub fn finish(&mut self, mut on_word: impl FnMut(Word)) {
        let trimmed_end = self.pending.trim_end().len();
        if let Some(start) = self.pending[..trimmed_end].find(|c: char| !c.is_whitespace()) {
            on_word(Word {
                leading: self.pending[..start].to_string(),
                text: self.pending[start..trimmed_end].to_string(),
            });
            self.emitted += 1;
        }
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str], min: usize, max: usize) -> (Vec<String>, Option<StopReason>) {
        let mut s = WordSplitter::new(min, max);
        let mut words = Vec::new();
        for p in pieces {
            if let Some(r) = s.push(p, |w| words.push(w.text)) {
                return (words, Some(r));
            }
        }
        s.finish(|w| words.push(w.text));
        (words, None)
    }

    #[test]
    fn a_word_is_emitted_only_once_whitespace_follows_it() {
        let mut s = WordSplitter::new(4, 8);
        let mut words = Vec::new();
        assert_eq!(s.push("Re", |w| words.push(w.text)), None);
        assert_eq!(s.push("moving", |w| words.push(w.text)), None);
        assert!(words.is_empty(), "a word is not complete until the next one starts");
        s.push(" odor", |w| words.push(w.text));
        assert_eq!(words, ["Removing"]);
    }

    #[test]
    fn stops_at_the_word_budget() {
        let pieces = ["One", " two", " three", " four", " five", " six", " seven", " eight", " nine", " ten"];
        let (words, reason) = run(&pieces, 4, 8);
        assert_eq!(words.len(), 8);
        assert_eq!(reason, Some(StopReason::WordBudget));
    }

    #[test]
    fn prefers_a_clause_boundary_once_min_words_are_out() {
        let (words, reason) = run(&["Paris", " is", " the", " capital,", " and", " it", " is"], 4, 8);
        assert_eq!(words, ["Paris", "is", "the", "capital,"]);
        assert_eq!(reason, Some(StopReason::ClauseBoundary));
    }

    #[test]
    fn ignores_clause_boundaries_before_min_words() {
        let (words, reason) = run(&["Sure!", " Here", " is", " how", " you", " do"], 4, 8);
        assert_eq!(words, ["Sure!", "Here", "is", "how", "you", "do"]);
        assert_eq!(reason, None);
    }

    #[test]
    fn a_line_break_is_a_clause_boundary() {
        let (words, reason) = run(&["Here", " are", " three", " ways\n\n1.", " Soak"], 4, 8);
        assert_eq!(words, ["Here", "are", "three", "ways"]);
        assert_eq!(reason, Some(StopReason::ClauseBoundary));
    }

    #[test]
    fn finish_flushes_the_last_word_without_trailing_space() {
        let (words, _) = run(&["Yes", " it", " is  "], 4, 8);
        assert_eq!(words, ["Yes", "it", "is"]);
    }

    #[test]
    fn multibyte_words_and_separators_are_kept_whole() {
        let mut s = WordSplitter::new(1, 8);
        let mut words = Vec::new();
        s.push("Grüße\u{00A0}", |w| words.push(w));
        s.push("日本語 ok", |w| words.push(w));
        s.finish(|w| words.push(w));
        assert_eq!(words[0].text, "Grüße");
        assert_eq!(words[1], Word { leading: "\u{00A0}".into(), text: "日本語".into() });
        assert_eq!(words[2].text, "ok");
    }

    #[test]
    fn finishing_a_sentence_ignores_commas_and_stops_at_its_end() {
        let mut s = WordSplitter::to_sentence_end(40);
        let mut words = Vec::new();
        let mut reason = None;
        for p in [" and", " dry,", " then", " rinse.", " Next"] {
            reason = s.push(p, |w| words.push(w.text));
            if reason.is_some() {
                break;
            }
        }
        assert_eq!(words, ["and", "dry,", "then", "rinse."]);
        assert_eq!(reason, Some(StopReason::SentenceEnd));
        assert!(ends_sentence("It is Paris.\"") && !ends_sentence("It is Paris,"));
    }

    #[test]
    fn finishing_a_sentence_goes_past_a_colon_and_a_list_number() {
        let mut s = WordSplitter::to_sentence_end(40);
        let mut words = Vec::new();
        let mut reason = None;
        for p in [" follow", " these", " steps:", "\n1.", " Soak", " them", " overnight.", " Then"] {
            reason = s.push(p, |w| words.push(w.text));
            if reason.is_some() {
                break;
            }
        }
        assert_eq!(words.join(" "), "follow these steps: 1. Soak them overnight.");
        assert_eq!(reason, Some(StopReason::SentenceEnd));
    }

    #[test]
    fn a_voice_opener_is_a_whole_sentence_long_enough_to_be_spoken() {
        let mut s = WordSplitter::voice(30, 20);
        let mut words = Vec::new();
        let mut reason = None;
        for p in ["Yes.", " Boil", " the", " egg", " for", " nine", " minutes.", " Then", " cool"] {
            reason = s.push(p, |w| words.push(w.text));
            if reason.is_some() {
                break;
            }
        }
        // "Yes." ends a sentence but is short of 30 characters; the next sentence end is not.
        assert_eq!(words.join(" "), "Yes. Boil the egg for nine minutes.");
        assert_eq!(reason, Some(StopReason::SentenceEnd));
        let mut s = WordSplitter::voice(30, 3);
        let mut words = Vec::new();
        let reason = s.push("One two three four ", |w| words.push(w.text));
        assert_eq!((words.len(), reason), (3, Some(StopReason::WordBudget)), "the word cap still holds");
    }

    #[test]
    fn a_token_carrying_several_words_emits_each() {
        let (words, reason) = run(&["a b c d e f g h i j"], 4, 6);
        assert_eq!(words, ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(reason, Some(StopReason::WordBudget));
    }
}
