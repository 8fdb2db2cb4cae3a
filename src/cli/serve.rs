//! `farsight serve`: the OpenAI-compatible HTTP server (see `src/server/`).

use clap::Args;

use super::common::{CliError, ModelArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model's name in the API (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Requests generated at once by the batch scheduler.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Prompt tokens per scheduler step (bounds the delay new prompts add to running streams).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// KV tokens the running requests may hold together (0: no limit beyond the context).
    #[arg(long, default_value_t = 0)]
    pub max_kv_tokens: usize,
    /// Largest request body in bytes (larger: 413).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Most prompt tokens per request (more: 400; default and cap: the model's context).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Most requests in flight, running or queued (more: 429).
    #[arg(long, default_value_t = 64)]
    pub max_concurrent: usize,
    /// max_tokens of a request that does not give one.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
}

pub fn run(a: ServeArgs) -> Result<(), CliError> {
    crate::server::run(a)
}
