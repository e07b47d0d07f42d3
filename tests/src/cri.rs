//! A small CRI client: `runtime.v1.ImageService/PullImage` over containerd's socket, which is
//! what kubelet calls to pull a pod's image. gRPC by hand (one unary call: a 5-byte frame
//! header and two protobuf fields), over HTTP/2 on the unix socket.

use std::path::Path;
use std::time::Duration;

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// `PullImageRequest { image: ImageSpec { image } }`.
fn pull_request(image: &str) -> Vec<u8> {
    let mut spec = vec![0x0a];
    varint(image.len(), &mut spec);
    spec.extend_from_slice(image.as_bytes());
    let mut msg = vec![0x0a];
    varint(spec.len(), &mut msg);
    msg.extend(spec);
    msg
}

/// The first string field of a protobuf message (`PullImageResponse.image_ref`).
fn first_string(msg: &[u8]) -> Option<String> {
    if msg.first() != Some(&0x0a) {
        return None;
    }
    let (mut len, mut shift, mut i) = (0usize, 0, 1);
    loop {
        let b = *msg.get(i)?;
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    String::from_utf8(msg.get(i..i + len)?.to_vec()).ok()
}

/// Pulls `image` through the CRI of the containerd listening on `socket`; returns the image
/// reference containerd reports (`sha256:...`), or the gRPC error.
pub fn pull_image(socket: &Path, image: &str, timeout: Duration) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        tokio::time::timeout(timeout, pull(socket, image))
            .await
            .map_err(|_| format!("CRI PullImage of {image} did not answer in {timeout:?}"))?
    })
}

async fn pull(socket: &Path, image: &str) -> Result<String, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let (client, conn) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::builder()
        .method("POST")
        .uri("http://localhost/runtime.v1.ImageService/PullImage")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (resp, mut send) = client.send_request(req, false).map_err(|e| e.to_string())?;
    let msg = pull_request(image);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend(msg);
    send.send_data(bytes::Bytes::from(frame), true)
        .map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| format!("PullImage: {e}"))?;
    let (parts, mut body) = resp.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    // A failed call may be "trailers-only": the status then sits in the headers.
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status").and_then(|v| v.to_str().ok()).map(|s| {
            let m = h
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            (s.to_owned(), m)
        })
    };
    let (status, message) = trailers
        .as_ref()
        .and_then(status_of)
        .or_else(|| status_of(&parts.headers))
        .ok_or("no grpc-status in the answer")?;
    if status != "0" {
        return Err(format!("grpc-status {status}: {message}"));
    }
    data.get(5..)
        .and_then(first_string)
        .ok_or_else(|| "PullImageResponse without image_ref".to_owned())
}
