//! `farsight serve`: an OpenAI-compatible HTTP server (tokio + axum) over the batch scheduler.
//!
//! One engine thread owns the model and runs the scheduler loop (`engine.rs`); the request
//! handlers (`handlers.rs`) validate and tokenize a request, send the engine a job over a
//! channel and answer from the job's event channel, whole or as server-sent events. Requests
//! in flight beyond `--max-concurrent` get 429; below it they queue in the scheduler, which
//! runs up to `--batch-size` of them at once.

mod engine;
mod handlers;
mod openai;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use farsight_engine::batch::BatchConfig;
use farsight_engine::TextTokenizer;

use crate::cli::common::{with_model, CliError};
use crate::cli::serve::ServeArgs;
use engine::{EngineStatus, Job};

/// Request limits.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_prompt_tokens: usize,
    pub max_concurrent: usize,
    pub default_max_tokens: usize,
}

/// What every handler shares.
pub struct AppState {
    jobs: Mutex<Sender<Job>>,
    tok: Arc<TextTokenizer>,
    model_name: String,
    limits: Limits,
    /// Requests being answered now.
    in_flight: AtomicUsize,
    /// Requests accepted so far (response ids).
    served: AtomicU64,
    status: Arc<Mutex<EngineStatus>>,
    /// Unix time the server started.
    started: u64,
}

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/v1/models", get(handlers::models))
        .route("/health", get(handlers::health))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Loads the model on the engine thread, then serves until SIGINT or SIGTERM.
pub fn run(a: ServeArgs) -> Result<(), CliError> {
    let cfg = BatchConfig {
        max_running: a.batch_size,
        prefill_tokens_per_step: a.prefill_chunk,
        kv_dtype: a.model.kv_dtype,
        kv_token_budget: a.max_kv_tokens,
    };
    if cfg.max_running == 0 || cfg.prefill_tokens_per_step == 0 || a.max_concurrent == 0 {
        return Err(CliError::Usage(
            "--batch-size, --prefill-chunk and --max-concurrent must be at least 1".into(),
        ));
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let status = Arc::new(Mutex::new(EngineStatus::default()));
    let engine_status = status.clone();
    let model_args = a.model.clone();
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let loaded = match model_args.load() {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let tok = Arc::new(loaded.tok);
            let _ = ready_tx.send(Ok((
                tok.clone(),
                loaded.model.cfg().context_length(),
                loaded.model.device_name(),
            )));
            with_model!(&loaded.model, m => engine::run(m, &tok, cfg, job_rx, engine_status));
        })
        .map_err(|e| CliError::Usage(format!("starting the engine thread: {e}")))?;
    let (tok, context, device) = ready_rx
        .recv()
        .map_err(|_| CliError::Usage("the engine thread ended while loading".into()))?
        .map_err(CliError::Usage)?;

    let model_name = a.served_model_name.clone().unwrap_or_else(|| {
        let dir = a
            .model
            .model
            .canonicalize()
            .unwrap_or_else(|_| a.model.model.clone());
        dir.file_name()
            .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
    });
    let limits = Limits {
        max_body_bytes: a.max_body_bytes,
        max_prompt_tokens: a.max_prompt_tokens.unwrap_or(context).min(context),
        max_concurrent: a.max_concurrent,
        default_max_tokens: a.default_max_tokens,
    };
    let state = Arc::new(AppState {
        jobs: Mutex::new(job_tx),
        tok,
        model_name: model_name.clone(),
        limits,
        in_flight: AtomicUsize::new(0),
        served: AtomicU64::new(0),
        status,
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Usage(format!("starting the runtime: {e}")))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .map_err(|e| CliError::Usage(format!("cannot listen on {}:{}: {e}", a.host, a.port)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| CliError::Usage(e.to_string()))?;
        eprintln!("farsight serve: {model_name} on {device}, listening on http://{addr}");
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| CliError::Usage(format!("server: {e}")))
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    eprintln!("farsight serve: shutting down");
}
