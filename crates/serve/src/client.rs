//! A minimal HTTP/1.1 client over a plain TCP stream (tests and `bench-serve`): one request per
//! connection, chunked bodies decoded, server-sent events handed over as they arrive.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| String::from_utf8_lossy(&self.body).into_owned())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `method path` with `body` (JSON when given) to `addr` ("host:port").
pub async fn request(addr: &str, method: &str, path: &str, body: Option<&[u8]>) -> Result<Reply> {
    let mut r = open(addr, method, path, body).await?;
    let (status, headers) = head(&mut r).await?;
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(c) = chunk(&mut r).await? {
            body.extend(c);
        }
    } else {
        r.read_to_end(&mut body).await?;
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Posts `body` and calls `on_data` with each SSE `data:` payload and the time it arrived,
/// until the stream ends; returns the status (a non-200 reply's body is the error).
pub async fn stream_sse(
    addr: &str,
    path: &str,
    body: &[u8],
    on_data: &mut (dyn FnMut(&str, Instant) -> Result<()> + Send),
) -> Result<u16> {
    let mut r = open(addr, "POST", path, Some(body)).await?;
    let (status, headers) = head(&mut r).await?;
    if status != 200 {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await?;
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&rest));
    }
    if !headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("text/event-stream"))
    {
        bail!("not an event stream: {headers:?}");
    }
    let mut pending = String::new();
    while let Some(c) = chunk(&mut r).await? {
        let at = Instant::now();
        pending.push_str(&String::from_utf8_lossy(&c));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    on_data(data.trim_start(), at)?;
                }
            }
        }
    }
    Ok(status)
}

async fn open(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<BufReader<TcpStream>> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    if let Some(b) = body {
        // A server may answer (413) before reading all of a large body.
        let _ = s.write_all(b).await;
    }
    Ok(BufReader::new(s))
}

async fn head(r: &mut BufReader<TcpStream>) -> Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).await?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// The next chunk of a chunked body, `None` after the last.
async fn chunk(r: &mut BufReader<TcpStream>) -> Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .with_context(|| format!("bad chunk size {line:?}"))?;
    if size == 0 {
        return Ok(None);
    }
    let mut buf = vec![0; size + 2];
    r.read_exact(&mut buf).await?;
    buf.truncate(size);
    Ok(Some(buf))
}
