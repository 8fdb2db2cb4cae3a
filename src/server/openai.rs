//! OpenAI API shapes: the request bodies of `/v1/completions` and `/v1/chat/completions` (the
//! fields farsight supports; others are ignored), the error body, and the response and
//! stream-chunk bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use farsight_engine::batch::SeqOutput;
use farsight_engine::chat::Message;
use serde::Deserialize;
use serde_json::{json, Value};

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            code,
        }
    }
    /// 400 `invalid_request_error`.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

/// `stop`: one string or a list.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Deserialize, Debug, Default, Clone)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Deserialize, Debug, Default, Clone)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    /// The chat API's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

impl Common {
    pub fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let v = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if v.len() > 4 {
            return Err(ApiError::invalid(
                "invalid_stop",
                "at most 4 stop sequences",
            ));
        }
        Ok(v)
    }
}

/// `prompt` of `/v1/completions`: a string, or a list holding one string.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub common: Common,
}

impl CompletionRequest {
    pub fn prompt_text(&self) -> Result<String, ApiError> {
        match &self.prompt {
            Prompt::One(s) => Ok(s.clone()),
            Prompt::Many(v) if v.len() == 1 => Ok(v[0].clone()),
            Prompt::Many(_) => Err(ApiError::invalid(
                "invalid_prompt",
                "prompt must be one string (batches of prompts are not supported)",
            )),
        }
    }
}

/// A chat message's `content`: a string or a list of parts (`{"type": "text", "text": ...}`).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub common: Common,
}

impl ChatRequest {
    /// The messages for the chat template (text parts joined; other parts refused).
    pub fn messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "invalid_messages",
                "messages must not be empty",
            ));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for m in &self.messages {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(s)) => s.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    "invalid_content",
                                    "only text content parts are supported",
                                ))
                            }
                        }
                    }
                    s
                }
            };
            out.push(Message {
                role: m.role.clone(),
                content,
            });
        }
        Ok(out)
    }
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// Identity of one response: id, creation time, model name.
#[derive(Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

pub fn usage(out: &SeqOutput) -> Value {
    let n = out.new_token_ids.len();
    json!({"prompt_tokens": out.prompt_tokens, "completion_tokens": n, "total_tokens": out.prompt_tokens + n})
}

impl Meta {
    /// The whole (non-streamed) response.
    pub fn response(&self, out: &SeqOutput) -> Value {
        let finish = out.finish.openai();
        match self.endpoint {
            Endpoint::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": out.text, "logprobs": null, "finish_reason": finish}],
                "usage": usage(out),
            }),
            Endpoint::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": null, "finish_reason": finish}],
                "usage": usage(out),
            }),
        }
    }

    /// A stream chunk carrying `text` (chat: the first chunk also names the role) and, on the
    /// last chunk, the finish reason.
    pub fn chunk(&self, text: &str, first: bool, finish: Option<&str>) -> Value {
        match self.endpoint {
            Endpoint::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            }),
            Endpoint::Chat => {
                let delta = match (first, finish) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, Some(_)) if text.is_empty() => json!({}),
                    _ => json!({"content": text}),
                };
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
        }
    }

    /// The usage chunk of `stream_options.include_usage` (no choices).
    pub fn usage_chunk(&self, out: &SeqOutput) -> Value {
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": usage(out)})
    }
}
