//! Joining the cloud's continuation to the opener without a visible seam: a restated opener
//! is dropped, the correction marker is lifted out, and spacing at the join is made right.

use super::prompt::CORRECTION_MARKER;

/// What the seam lets through for one delta.
#[derive(Debug, Default, PartialEq)]
pub struct SeamOutput {
    /// Text to show after what was shown before.
    pub text: String,
    /// The continuation began with the correction marker.
    pub correction: bool,
}

/// Holds back the start of the continuation until it can tell whether it restates the opener
/// or carries the marker; after that, text passes straight through.
pub struct Seam {
    opener: String,
    held: String,
    decided: bool,
}

fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

impl Seam {
    pub fn new(opener: &str) -> Self {
        Self { opener: opener.trim_end().to_string(), held: String::new(), decided: false }
    }

    /// Feeds a delta; returns what may be shown now.
    pub fn push(&mut self, delta: &str) -> SeamOutput {
        if self.decided {
            return SeamOutput { text: delta.to_string(), correction: false };
        }
        self.held.push_str(delta);
        let start = self.held.trim_start();
        // Undecided while the held text could still grow into the marker or the opener.
        let could_be = |full: &str| {
            let a = normalize(start);
            let b = normalize(full);
            !a.is_empty() && b.starts_with(&a) && a.len() < b.len()
        };
        if start.is_empty() || could_be(CORRECTION_MARKER) || could_be(&self.opener) {
            return SeamOutput::default();
        }
        self.finish()
    }

    /// The stream ended: release whatever is held.
    pub fn flush(&mut self) -> SeamOutput {
        if self.decided || self.held.trim().is_empty() {
            self.decided = true;
            return SeamOutput::default();
        }
        self.finish()
    }

    fn finish(&mut self) -> SeamOutput {
        self.decided = true;
        let mut rest = std::mem::take(&mut self.held);
        let mut correction = false;
        if let Some(after) = rest.trim_start().strip_prefix(CORRECTION_MARKER) {
            correction = true;
            rest = after.to_string();
        }
        let rest = strip_restated(&self.opener, &rest);
        SeamOutput { text: join_spacing(&self.opener, &rest), correction }
    }
}

/// Removes a restatement of the opener from the start of `text` (case and spacing ignored).
fn strip_restated(opener: &str, text: &str) -> String {
    let want: Vec<String> = opener.split_whitespace().map(str::to_lowercase).collect();
    if want.is_empty() {
        return text.to_string();
    }
    let mut rest = text.trim_start();
    for w in &want {
        let Some(word) = rest.split_whitespace().next() else { return text.to_string() };
        if word.to_lowercase() != *w {
            return text.to_string();
        }
        rest = rest[rest.find(word).unwrap() + word.len()..].trim_start_matches([' ', '\t']);
    }
    // Keep the separator that followed the restatement, so spacing is decided below.
    let consumed = text.len() - rest.len();
    text[consumed..].to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stitch(opener: &str, deltas: &[&str]) -> (String, bool) {
        let mut seam = Seam::new(opener);
        let mut out = String::new();
        let mut corrected = false;
        for d in deltas {
            let o = seam.push(d);
            out.push_str(&o.text);
            corrected |= o.correction;
        }
        let o = seam.flush();
        out.push_str(&o.text);
        (out, corrected || o.correction)
    }

    #[test]
    fn a_plain_continuation_gets_one_space() {
        assert_eq!(stitch("The sky looks blue because", &["sun", "light scatters."]).0, " sunlight scatters.");
        assert_eq!(stitch("The sky looks blue because", &["   of", " scattering."]).0, " of scattering.");
    }

    #[test]
    fn punctuation_attaches_without_a_space() {
        assert_eq!(stitch("Paris is the capital", &[", and", " it is big."]).0, ", and it is big.");
    }

    #[test]
    fn a_restated_opener_is_dropped_even_across_deltas() {
        let (out, _) = stitch("Removing odor from inside", &["Removing odor", " from in", "side your shoes is easy."]);
        assert_eq!(out, " your shoes is easy.");
        let (out, _) = stitch("The capital of France", &["the capital of france is Paris."]);
        assert_eq!(out, " is Paris.");
    }

    #[test]
    fn a_continuation_that_only_starts_like_the_opener_is_kept() {
        assert_eq!(stitch("The capital of France", &["The", " answer is Paris."]).0, " The answer is Paris.");
    }

    #[test]
    fn the_correction_marker_is_lifted_out() {
        let (out, corrected) = stitch("The moon is made of", &["[[redi", "rect]] Actually,", " it is rock."]);
        assert!(corrected);
        assert_eq!(out, " Actually, it is rock.");
    }

    #[test]
    fn a_newline_start_is_kept_without_an_added_space() {
        assert_eq!(stitch("Here are three ways:", &["\n1. Soak them."]).0, "\n1. Soak them.");
    }
}
