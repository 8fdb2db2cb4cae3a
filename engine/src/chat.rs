//! Chat templates: the Jinja template of `tokenizer_config.json`, rendered with minijinja the
//! way transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python
//! string methods, `raise_exception`).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::{EngineError, Result};

/// One chat message.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn raise_exception(msg: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders the conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        t.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| EngineError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_python_methods_and_blocks_trimmed() {
        let src = "{% for m in messages %}{% if m.role == 'system' %}[S]{{ m.content.strip() }}\n{% else %}<{{ m.role }}>{{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let t = ChatTemplate::new(src.into(), None, Some("</s>".into())).unwrap();
        let msgs = vec![
            Message {
                role: "system".into(),
                content: "  be brief ".into(),
            },
            Message {
                role: "user".into(),
                content: "hi".into(),
            },
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "[S]be brief\n<user>hi</s>\n<assistant>"
        );
        assert_eq!(t.render(&msgs[1..], false).unwrap(), "<user>hi</s>\n");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let t = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}".into(),
            None,
            None,
        )
        .unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
        assert!(ChatTemplate::new("{% for %}".into(), None, None).is_err());
    }
}
