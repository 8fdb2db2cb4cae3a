//! `farsight serve` end to end over real HTTP (a small HTTP/1.1 client on `TcpStream`):
//! both endpoints whole and streamed, concurrent requests batched by the scheduler, and the
//! error answers (413, 400, 404, 429).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A running server, killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = farsight()
            .arg("serve")
            .arg("--model")
            .arg(model_dir())
            .args(["--port", "0"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            assert!(
                err.read_line(&mut line).unwrap() > 0,
                "server exited before listening"
            );
            if let Some(i) = line.find("listening on http://") {
                break line[i + "listening on http://".len()..].trim().to_string();
            }
        };
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Server { child, addr }
    }

    /// One request; returns the status and the (de-chunked) body.
    fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_response(&raw)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, b) = self.call("POST", path, body.to_string().as_bytes());
        (
            status,
            serde_json::from_slice(&b)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&b))),
        )
    }

    fn get(&self, path: &str) -> Value {
        let (status, b) = self.call("GET", path, b"");
        assert_eq!(status, 200);
        serde_json::from_slice(&b).unwrap()
    }

    /// A streamed request: the `data:` payloads in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let (status, b) = self.call("POST", path, body.to_string().as_bytes());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
        let text = String::from_utf8(b).unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_response(raw: &[u8]) -> (u16, Vec<u8>) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 4 + n..];
        }
        body = out;
    }
    (status, body)
}

/// Joins the text of streamed chunks; returns it and the last chunk's finish reason.
fn join_stream(events: &[String], chat: bool) -> (String, String) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        let piece = if chat {
            &c["delta"]["content"]
        } else {
            &c["text"]
        };
        text.push_str(piece.as_str().unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

#[test]
fn completions_whole_and_streamed() {
    let srv = Server::start(&[]);
    let req = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
    let (status, v) = srv.post("/v1/completions", &req);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["usage"]["total_tokens"], 13);
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let events = srv.stream("/v1/completions", &sreq);
    let (streamed, finish) = join_stream(&events, false);
    assert_eq!(streamed, text);
    assert_eq!(finish, "length");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    // a stop string ends the text before it
    let (_, v) = srv.post("/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stop": ["Paris"]}));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(!v["choices"][0]["text"].as_str().unwrap().contains("Paris"));
}

#[test]
fn chat_whole_and_streamed_and_models() {
    let srv = Server::start(&[]);
    let req = json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 30, "temperature": 0, "seed": 1,
    });
    let (status, v) = srv.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("Paris"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let events = srv.stream("/v1/chat/completions", &sreq);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(join_stream(&events, true), (text, "stop".to_string()));
    let models = srv.get("/v1/models");
    assert_eq!(models["data"][0]["id"], "smollm2-135m-instruct");
    assert_eq!(srv.get("/health")["status"], "ok");
}

#[test]
fn concurrent_requests_are_correct_and_batched() {
    let srv = Server::start(&["--batch-size", "4"]);
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "The three primary colors are",
    ];
    let req = |p: &str| json!({"prompt": p, "max_tokens": 16, "temperature": 0});
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            srv.post("/v1/completions", &req(p)).1["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(srv.get("/health")["scheduler"]["batched_steps"], 0);
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (srv, body) = (&srv, req(p));
                s.spawn(move || {
                    srv.post("/v1/completions", &body).1["choices"][0]["text"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    let health = srv.get("/health");
    let st = &health["scheduler"];
    assert!(st["batched_steps"].as_u64().unwrap() > 0, "{health}");
    assert!(st["max_batch"].as_u64().unwrap() >= 2, "{health}");
    assert_eq!(st["finished"], 8);
    assert_eq!(health["in_flight"], 0);
}

#[test]
fn errors_have_the_openai_shape() {
    let srv = Server::start(&[
        "--max-body-bytes",
        "4096",
        "--max-prompt-tokens",
        "16",
        "--max-concurrent",
        "1",
    ]);
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("").to_string();
    let big = json!({"prompt": "a".repeat(10_000)});
    let (status, v) = srv.post("/v1/completions", &big);
    assert_eq!(
        (status, code(&v).as_str()),
        (413, "request_too_large"),
        "{v}"
    );
    let (status, b) = srv.call("POST", "/v1/chat/completions", b"{\"messages\": [");
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid request body"),
        "{v}"
    );
    let (status, v) = srv.post(
        "/v1/completions",
        &json!({"prompt": "hi", "model": "gpt-4"}),
    );
    assert_eq!((status, code(&v).as_str()), (404, "model_not_found"));
    let (status, v) = srv.post("/v1/completions", &json!({"prompt": "hi", "n": 2}));
    assert_eq!((status, code(&v).as_str()), (400, "invalid_n"));
    let (status, v) = srv.post("/v1/completions", &json!({"prompt": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen"}));
    assert_eq!(
        (status, code(&v).as_str()),
        (400, "context_length_exceeded")
    );
    let (status, v) = srv.post(
        "/v1/completions",
        &json!({"prompt": "hi", "temperature": -1}),
    );
    assert_eq!((status, code(&v).as_str()), (400, "invalid_sampling"));
    let (status, _) = srv.call("GET", "/v1/nothing", b"");
    assert_eq!(status, 404);

    // One request in flight (a long stream, read up to its first chunk) fills --max-concurrent 1.
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": true})
            .to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !line.starts_with("data:") {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0);
    }
    let (status, v) = srv.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 1}));
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (429, Some("rate_limit_error")),
        "{v}"
    );
    drop(r); // the client goes away: the stream is cancelled and the slot freed
    let mut ok = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        if srv.get("/health")["in_flight"] == 0 {
            ok = true;
            break;
        }
    }
    assert!(ok, "the dropped stream still counts as in flight");
    let (status, _) = srv.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 1}));
    assert_eq!(status, 200);
}
