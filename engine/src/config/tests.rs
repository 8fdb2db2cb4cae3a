use super::*;

const SMOL: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
  "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
  "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
  "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": true,
  "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "float16"
}"#;

fn parse(s: &str) -> Result<ModelConfig, EngineError> {
    ModelConfig::from_json(s, Path::new("config.json"))
}

#[test]
fn smollm2_config() {
    let c = parse(SMOL).unwrap();
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!(c.kv_width(), 192);
    assert!(c.tie_word_embeddings && !c.qkv_bias);
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.rope_scaling, RopeScaling::None);
}

#[test]
fn llama31_qwen2_mistral_and_transformers5_rope_parameters() {
    let l = parse(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,
        "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,
        "max_position_embeddings":131072,"rope_theta":500000.0,"eos_token_id":[128001,128008,128009],
        "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#).unwrap();
    assert!(matches!(l.rope_scaling, RopeScaling::Llama3 { .. }));
    assert_eq!(l.eos_token_ids.len(), 3);
    assert_eq!(l.head_dim, 128);
    let q = parse(r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":896,
        "intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,
        "vocab_size":151936,"use_sliding_window":false,"sliding_window":32768}"#).unwrap();
    assert!(q.qkv_bias && q.sliding_window.is_none());
    let m = parse(r#"{"architectures":["MistralForCausalLM"],"model_type":"mistral","hidden_size":4096,
        "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
        "vocab_size":32000,"sliding_window":4096}"#).unwrap();
    assert_eq!(m.sliding_window, Some(4096));
    let t5 = parse(
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100,
        "rope_parameters":{"rope_type":"linear","factor":2.0,"rope_theta":1234.0}}"#,
    )
    .unwrap();
    assert_eq!(t5.rope_theta, 1234.0);
    assert_eq!(t5.rope_scaling, RopeScaling::Linear { factor: 2.0 });
}

#[test]
fn unsupported_and_malformed_configs_name_the_field() {
    let e = parse(&SMOL.replace("LlamaForCausalLM", "GPT2LMHeadModel"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("GPT2LMHeadModel"), "{e}");
    let e = parse(&SMOL.replace("\"silu\"", "\"gelu\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("gelu"), "{e}");
    let e = parse(&SMOL.replace("\"hidden_size\": 576,", ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden_size"), "{e}");
    let e = parse(&SMOL.replace("\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("KV heads"), "{e}");
    let e = parse(&SMOL.replace(
        "\"rope_theta\": 100000.0",
        "\"rope_scaling\": {\"type\": \"su\", \"factor\": 2}",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("`su`"), "{e}");
    assert!(parse("{not json")
        .unwrap_err()
        .to_string()
        .contains("not valid JSON"));
    let e = parse(&SMOL.replace("\"vocab_size\": 49152", "\"vocab_size\": \"big\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab_size"), "{e}");
}
