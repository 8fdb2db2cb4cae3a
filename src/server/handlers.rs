//! The HTTP routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//! `GET /health`, and the error answers (413 body too large, 400 malformed JSON or bad
//! settings, 404 unknown model or route, 429 too many requests in flight).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use farsight_engine::batch::SeqRequest;
use farsight_engine::sampler::SamplingParams;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

use super::engine::{Event, Job};
use super::openai::{ApiError, ChatRequest, Common, CompletionRequest, Endpoint, Meta};
use super::AppState;

/// Counts a request in flight for as long as it lives.
pub struct InFlightGuard(Arc<AppState>);

impl InFlightGuard {
    fn enter(st: &Arc<AppState>) -> Result<InFlightGuard, ApiError> {
        let n = st.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlightGuard(st.clone());
        if n >= st.limits.max_concurrent {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "too_many_requests",
                format!(
                    "{} requests are already in flight (--max-concurrent); retry later",
                    n
                ),
            ));
        }
        Ok(guard)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(status, "invalid_request_error", code, r.body_text())
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("invalid_json", format!("invalid request body: {e}")))
}

pub async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let guard = InFlightGuard::enter(&st)?;
        let req: CompletionRequest = parse(body)?;
        let prompt = req.prompt_text()?;
        start(&st, guard, req.common, prompt, Endpoint::Completions).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn chat(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let guard = InFlightGuard::enter(&st)?;
        let req: ChatRequest = parse(body)?;
        let msgs = req.messages()?;
        let tmpl = st.tok.chat_template.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "no_chat_template",
                "the model has no chat template; use /v1/completions",
            )
        })?;
        let prompt = tmpl
            .render(&msgs, true)
            .map_err(|e| ApiError::invalid("invalid_messages", e.to_string()))?;
        start(&st, guard, req.common, prompt, Endpoint::Chat).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// Validates the settings, tokenizes, hands the job to the engine and answers (whole or SSE).
async fn start(
    st: &Arc<AppState>,
    guard: InFlightGuard,
    c: Common,
    prompt: String,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    if let Some(m) = &c.model {
        if *m != st.model_name {
            let msg = format!(
                "The model `{m}` does not exist (this server has `{}`)",
                st.model_name
            );
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                msg,
            ));
        }
    }
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("invalid_n", "only n=1 is supported"));
    }
    let seq = st.served.fetch_add(1, Ordering::SeqCst);
    let sampling = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k: 0,
        top_p: c.top_p.unwrap_or(1.0),
        seed: c.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(seq, |d| d.as_nanos() as u64 ^ seq)
        }),
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid("invalid_sampling", e.to_string()))?;
    let stop = c.stop_strings()?;
    let ids = st
        .tok
        .encode(&prompt)
        .map_err(|e| ApiError::invalid("invalid_prompt", e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid("invalid_prompt", "the prompt is empty"));
    }
    if ids.len() > st.limits.max_prompt_tokens {
        let msg = format!(
            "the prompt has {} tokens; this server takes at most {} prompt tokens",
            ids.len(),
            st.limits.max_prompt_tokens
        );
        return Err(ApiError::invalid("context_length_exceeded", msg));
    }
    let max_new_tokens = c
        .max_tokens
        .or(c.max_completion_tokens)
        .unwrap_or(st.limits.default_max_tokens);
    let (tx, rx) = unbounded_channel();
    let job = Job {
        req: SeqRequest {
            prompt: ids,
            max_new_tokens,
            sampling,
            stop,
        },
        events: tx,
    };
    st.jobs
        .lock()
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "engine_stopped",
                "the engine stopped",
            )
        })?
        .send(job)
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "engine_stopped",
                "the engine stopped",
            )
        })?;
    let prefix = if endpoint == Endpoint::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let meta = Meta {
        id: format!("{prefix}-{seq}"),
        created: now_s(),
        model: st.model_name.clone(),
        endpoint,
    };
    if c.stream {
        let usage = c.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream(meta, rx, guard, usage))
    } else {
        whole(meta, rx).await
    }
}

async fn whole(meta: Meta, mut rx: UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(_) => {}
            Event::Done(out) => return Ok(Json(meta.response(&out)).into_response()),
            Event::Error(e) => return Err(engine_error(e)),
        }
    }
    Err(engine_error("the engine stopped".into()))
}

fn engine_error(msg: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "engine_error",
        msg,
    )
}

/// Server-sent events: one `data: {chunk}` per text delta, a last chunk with the finish
/// reason (and a usage chunk when asked), then `data: [DONE]`.
fn stream(
    meta: Meta,
    mut rx: UnboundedReceiver<Event>,
    guard: InFlightGuard,
    usage: bool,
) -> Response {
    let (tx, out) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let _guard = guard;
        let send = |v: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(v))).await.is_ok() }
        };
        let mut first = meta.endpoint == Endpoint::Chat;
        if first {
            if !send(meta.chunk("", true, None).to_string()).await {
                return;
            }
            first = false;
        }
        while let Some(ev) = rx.recv().await {
            let mut msgs: Vec<Value> = Vec::new();
            let end = match ev {
                Event::Text(t) => {
                    msgs.push(meta.chunk(&t, first, None));
                    false
                }
                Event::Done(o) => {
                    msgs.push(meta.chunk("", false, Some(o.finish.openai())));
                    if usage {
                        msgs.push(meta.usage_chunk(&o));
                    }
                    true
                }
                Event::Error(e) => {
                    msgs.push(json!({"error": {"message": e, "type": "server_error", "param": null, "code": "engine_error"}}));
                    true
                }
            };
            for m in msgs {
                if !send(m.to_string()).await {
                    return; // the client went away; dropping `rx` cancels the sequence
                }
            }
            if end {
                send("[DONE]".into()).await;
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(out)).into_response()
}

pub async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.started, "owned_by": "farsight"}]}),
    )
}

/// Liveness plus the scheduler's counters (`batched_steps` > 0 shows requests were batched).
pub async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    let status = st.status.lock().map(|s| *s).unwrap_or_default();
    Json(json!({
        "status": "ok",
        "model": st.model_name,
        "in_flight": st.in_flight.load(Ordering::SeqCst),
        "scheduler": status,
    }))
}

pub async fn not_found() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such route",
    )
    .into_response()
}
