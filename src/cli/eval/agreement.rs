//! `farsight eval agreement`: top-1 agreement and mean KL of sparse against dense logits over
//! the same text (takes the arguments of `eval ppl`).

use farsight_engine::eval::agreement;
use farsight_engine::kv::{new_store, Attention};

use super::{load_text, out_line, PplArgs};
use crate::cli::common::{token_progress, with_model, CliError};
use crate::cli::sparse::AttentionKind;

pub(super) fn agree(a: PplArgs) -> Result<(), CliError> {
    if a.sparse.attention == AttentionKind::Dense {
        return Err(CliError::Usage(
            "eval agreement compares sparse with dense: pass --attention double-sparse".into(),
        ));
    }
    let (mut loaded, ids) = load_text(&a.model, &a.text, a.max_tokens, a.chunk)?;
    let attention = a
        .sparse
        .attention_planned(&a.model, &mut loaded.model, ids.len())?
        .per_position();
    eprintln!(
        "eval agreement: model {}, {} tokens of {}, device {}, kv {}, {} vs dense",
        a.model.model.display(),
        ids.len(),
        a.text.display(),
        loaded.model.device_name(),
        a.model.kv_dtype,
        attention.describe()
    );
    let pb = token_progress(ids.len(), "agreement", 2048);
    let r = with_model!(&loaded.model, m => {
        let mut dense = new_store(m, a.model.kv_dtype, &Attention::Dense)?;
        let mut sparse = new_store(m, a.model.kv_dtype, &attention)?;
        agreement(m, &ids, a.chunk, dense.as_mut(), sparse.as_mut(), &mut |d, _| pb.set_position(d as u64))
    })?;
    pb.finish_and_clear();
    if a.json {
        let v = serde_json::json!({
            "agreement": r,
            "settings": { "model": a.model.model, "text": a.text, "tokens": ids.len(), "kv_dtype": a.model.kv_dtype.name(), "attention": attention.describe() },
        });
        return out_line(&v.to_string());
    }
    out_line(&format!(
        "top-1 agreement {:.4} over {} positions; mean KL {:.5} nats (max {:.4}); {:.1} s",
        r.top1, r.positions, r.mean_kl, r.max_kl, r.seconds
    ))
}
