//! A request as a conversation: messages in OpenAI's shape (role, content, and whatever else
//! a client sent with them: tool calls, tool call ids, names), the last one the turn to
//! answer. The device sees its system, user and assistant text ([`Conversation::prompt`]);
//! the cloud gets every message as it came ([`Conversation::to_cloud`]).

use serde_json::{Map, Value};

use crate::engine::{Prompt, Speaker, Turn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }

    /// `system`, `developer` (OpenAI's newer name for it), `user`, `assistant` or `tool`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "system" | "developer" => Some(Self::System),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            "tool" => Some(Self::Tool),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The message's other fields in OpenAI's shape (`tool_calls`, `tool_call_id`, `name`),
    /// passed to the cloud untouched.
    pub extra: Map<String, Value>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), extra: Map::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

impl Conversation {
    /// One question, nothing before it.
    pub fn question(query: impl Into<String>) -> Self {
        Self { messages: vec![Message::new(Role::User, query)] }
    }

    /// The role of the turn to answer.
    pub fn last_role(&self) -> Option<Role> {
        self.messages.last().map(|m| m.role)
    }

    /// The question: the last user turn's text.
    pub fn query(&self) -> &str {
        self.messages.iter().rev().find(|m| m.role == Role::User).map(|m| m.content.as_str()).unwrap_or("")
    }

    /// All text in the conversation, in bytes (for the size limit).
    pub fn bytes(&self) -> usize {
        self.messages.iter().map(|m| m.content.len() + Value::Object(m.extra.clone()).to_string().len()).sum()
    }

    /// What the device writes its opener from: the system turns joined, the earlier user and
    /// assistant turns with text (tool traffic is the cloud's business), the last user turn.
    pub fn prompt(&self) -> Prompt {
        let system: Vec<&str> = self.messages.iter().filter(|m| m.role == Role::System).map(|m| m.content.as_str()).collect();
        let last_user = self.messages.iter().rposition(|m| m.role == Role::User);
        let history = self.messages[..last_user.unwrap_or(0)]
            .iter()
            .filter(|m| !m.content.trim().is_empty())
            .filter_map(|m| match m.role {
                Role::User => Some(Turn { speaker: Speaker::User, text: m.content.clone() }),
                Role::Assistant => Some(Turn { speaker: Speaker::Assistant, text: m.content.clone() }),
                Role::System | Role::Tool => None,
            })
            .collect();
        Prompt {
            system: (!system.is_empty()).then(|| system.join("\n\n")),
            history,
            query: self.query().to_string(),
            continue_from: None,
        }
    }

    /// Every message in OpenAI's shape, as the cloud receives it.
    pub fn to_cloud(&self) -> Vec<Value> {
        self.messages
            .iter()
            .map(|m| {
                let mut v = m.extra.clone();
                v.insert("role".into(), m.role.name().into());
                // An assistant turn that only calls tools has no content, in OpenAI's shape.
                let content = if m.content.is_empty() && m.role == Role::Assistant && m.extra.contains_key("tool_calls") {
                    Value::Null
                } else {
                    m.content.clone().into()
                };
                v.insert("content".into(), content);
                Value::Object(v)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_sees_the_text_the_cloud_sees_everything() {
        let mut call = Message::new(Role::Assistant, "");
        call.extra.insert("tool_calls".into(), serde_json::json!([{"id": "c1", "type": "function", "function": {"name": "light_on", "arguments": "{}"}}]));
        let mut result = Message::new(Role::Tool, "{\"ok\": true}");
        result.extra.insert("tool_call_id".into(), "c1".into());
        let c = Conversation {
            messages: vec![
                Message::new(Role::System, "You control the house."),
                Message::new(Role::User, "Turn on the light."),
                call,
                result,
                Message::new(Role::Assistant, "Done, the light is on."),
                Message::new(Role::User, "And the fan?"),
            ],
        };
        let p = c.prompt();
        assert_eq!(p.system.as_deref(), Some("You control the house."));
        assert_eq!(p.query, "And the fan?");
        let texts: Vec<&str> = p.history.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(texts, ["Turn on the light.", "Done, the light is on."]);
        let cloud = c.to_cloud();
        assert_eq!(cloud.len(), 6);
        assert_eq!(cloud[2]["content"], Value::Null);
        assert_eq!(cloud[2]["tool_calls"][0]["function"]["name"], "light_on");
        assert_eq!((cloud[3]["role"].as_str(), cloud[3]["tool_call_id"].as_str()), (Some("tool"), Some("c1")));
    }
}
