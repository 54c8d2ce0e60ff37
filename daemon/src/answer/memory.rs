//! Conversations the daemon keeps for clients that cannot (an MQTT automation, a gRPC app
//! that sends only the new question): the turns of each `conversation_id`, bounded in number
//! of conversations, turns, bytes and age.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::conversation::{Message, Role};
use crate::config::ConversationSection;
use crate::engine::RequestError;

pub struct Conversations {
    keep: usize,
    turns: usize,
    bytes: usize,
    ttl: Duration,
    kept: Mutex<HashMap<String, Kept>>,
}

struct Kept {
    turns: VecDeque<Message>,
    bytes: usize,
    last: Instant,
}

impl Conversations {
    pub fn new(c: &ConversationSection) -> Self {
        Self { keep: c.keep, turns: c.keep_turns, bytes: c.keep_bytes, ttl: Duration::from_secs(c.keep_minutes * 60), kept: Mutex::new(HashMap::new()) }
    }

    /// A usable id: 1–128 of letters, digits and `_-.:`.
    pub fn check_id(id: &str) -> Result<(), RequestError> {
        if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')) {
            return Err(RequestError::InvalidOptions(format!("conversation_id {id:?} must be 1 to 128 letters, digits or _-.:")));
        }
        Ok(())
    }

    /// The turns kept for `id`, oldest first (none when it is unknown or expired).
    pub fn recall(&self, id: &str) -> Vec<Message> {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut kept);
        kept.get(id).map(|k| k.turns.iter().cloned().collect()).unwrap_or_default()
    }

    /// Adds a question and its answer to `id`, dropping its oldest turns past the bounds, and
    /// the least recently used conversation when there are too many.
    pub fn remember(&self, id: &str, question: &str, answer: &str) {
        if self.keep == 0 || self.turns == 0 {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut kept);
        if !kept.contains_key(id) && kept.len() >= self.keep {
            if let Some(oldest) = kept.iter().min_by_key(|(_, k)| k.last).map(|(id, _)| id.clone()) {
                kept.remove(&oldest);
            }
        }
        let k = kept.entry(id.to_string()).or_insert_with(|| Kept { turns: VecDeque::new(), bytes: 0, last: Instant::now() });
        for m in [Message::new(Role::User, question), Message::new(Role::Assistant, answer)] {
            k.bytes += m.content.len();
            k.turns.push_back(m);
        }
        while k.turns.len() > self.turns || k.bytes > self.bytes {
            let Some(m) = k.turns.pop_front() else { break };
            k.bytes -= m.content.len();
        }
        k.last = Instant::now();
    }

    fn expire(&self, kept: &mut HashMap<String, Kept>) {
        kept.retain(|_, k| k.last.elapsed() < self.ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(keep: usize, turns: usize, bytes: usize) -> Conversations {
        Conversations::new(&ConversationSection { max_messages: 256, max_bytes: 1 << 20, keep, keep_turns: turns, keep_bytes: bytes, keep_minutes: 60 })
    }

    #[test]
    fn turns_are_kept_per_id_within_their_bounds() {
        let s = store(2, 4, 1000);
        s.remember("a", "What is the capital of France?", "Paris.");
        s.remember("a", "And its population?", "About two million.");
        s.remember("a", "And Spain's capital?", "Madrid.");
        let texts: Vec<String> = s.recall("a").into_iter().map(|m| m.content).collect();
        assert_eq!(texts, ["And its population?", "About two million.", "And Spain's capital?", "Madrid."], "four turns at most");
        assert!(s.recall("b").is_empty());
        s.remember("b", "Hi", "Hello.");
        s.remember("c", "Hey", "Hi.");
        assert!(s.recall("a").is_empty(), "the least recently used conversation went");
        let small = store(4, 100, 20);
        small.remember("x", "a question of many bytes", "an answer");
        assert!(small.recall("x").iter().map(|m| m.content.len()).sum::<usize>() <= 20);
        assert!(Conversations::check_id("kitchen-1:chat").is_ok() && Conversations::check_id("a/b").is_err());
    }
}
