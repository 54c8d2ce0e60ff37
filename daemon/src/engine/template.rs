//! Rendering a model's chat template (Jinja, as Hugging Face defines it) with minijinja.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

/// One chat turn.
#[derive(Debug, Clone, Serialize)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// A compiled chat template. Templates written for Python's Jinja use Python string methods
/// (`strip`, `startswith`…) and `raise_exception`, so both are provided.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: Option<&str>, eos: &str) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())?;
        let t = Self { env, bos: bos.unwrap_or_default().to_string(), eos: eos.to_string() };
        // Fail at load, not on the first request.
        t.render(&[Message { role: "user", content: "hello" }])?;
        Ok(t)
    }

    /// The prompt text for `messages`, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[Message<'_>]) -> Result<String, Error> {
        self.env.get_template("chat")?.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, None, "<|im_end|>").unwrap();
        let text = t.render(&[Message { role: "user", content: "Hi there" }]).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip() }}{{ bos_token }}", Some("<s>"), "</s>").unwrap();
        assert_eq!(t.render(&[Message { role: "user", content: "  x " }]).unwrap(), "x<s>");
    }

    #[test]
    fn a_broken_template_is_rejected_at_load() {
        assert!(ChatTemplate::new("{% for %}", None, "x").is_err());
        assert!(ChatTemplate::new("{{ raise_exception('no user turns') }}", None, "x").is_err());
    }
}
