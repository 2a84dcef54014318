//! `hutch image ...`: the server's `/v1/images` routes.

use std::collections::HashMap;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::io::ReaderStream;

use crate::args::{ConnectionArgs, ImageArgs, ImageCommand};
use crate::client::Client;
use crate::config::Connection;

pub async fn image(connection: &ConnectionArgs, args: ImageArgs) -> anyhow::Result<()> {
    let client = Client::new(Connection::resolve(connection)?)?;
    match args.command {
        ImageCommand::Pull { reference, username, password } => {
            pull(&client, &reference, username, password).await
        }
        ImageCommand::Ls => list(&client).await,
        ImageCommand::Import { file } => import(&client, &file).await,
        ImageCommand::Rm { reference } => {
            client.delete_image(&reference).await?;
            println!("{reference}");
            Ok(())
        }
    }
}

/// One line of the pull's NDJSON progress stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PullEvent {
    Resolving,
    Layer {
        digest: String,
        done_bytes: u64,
        total_bytes: u64,
    },
    Done(Value),
    Failed {
        code: String,
        message: String,
    },
    /// A status this client does not know: ignored.
    Other,
}

fn parse_event(line: &[u8]) -> anyhow::Result<PullEvent> {
    let value: Value =
        serde_json::from_slice(line).context("invalid progress line from the server")?;
    Ok(match value["status"].as_str() {
        Some("resolving") => PullEvent::Resolving,
        Some("layer") => PullEvent::Layer {
            digest: value["digest"].as_str().unwrap_or_default().to_owned(),
            done_bytes: value["done_bytes"].as_u64().unwrap_or(0),
            total_bytes: value["total_bytes"].as_u64().unwrap_or(0),
        },
        Some("done") => PullEvent::Done(value["image"].clone()),
        Some("error") => PullEvent::Failed {
            code: value["error"]["code"].as_str().unwrap_or("error").to_owned(),
            message: value["error"]["message"].as_str().unwrap_or("the pull failed").to_owned(),
        },
        _ => PullEvent::Other,
    })
}

/// Byte totals over all layers seen so far.
#[derive(Debug, Default)]
struct Progress {
    layers: HashMap<String, (u64, u64)>,
}

impl Progress {
    fn update(&mut self, digest: String, done: u64, total: u64) -> (u64, u64) {
        self.layers.insert(digest, (done, total));
        self.layers.values().fold((0, 0), |(d, t), (done, total)| (d + done, t + total.max(done)))
    }
}

async fn pull(
    client: &Client,
    reference: &str,
    username: Option<String>,
    password: Option<String>,
) -> anyhow::Result<()> {
    let mut body = json!({ "reference": reference });
    if let Some(username) = username {
        body["username"] = json!(username);
    }
    if let Some(password) = password {
        body["password"] = json!(password);
    }
    let response = client.send(client.request(Method::POST, "/images/pull").json(&body)).await?;

    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}")
            .context("progress bar template")?,
    );
    bar.set_message(format!("pulling {reference}"));
    let mut progress = Progress::default();
    let mut pending = Vec::new();
    let mut stream = response.bytes_stream();
    let mut outcome = None;
    'read: while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk.context("the pull's progress stream broke off")?);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            match parse_event(line)? {
                PullEvent::Resolving | PullEvent::Other => {}
                PullEvent::Layer { digest, done_bytes, total_bytes } => {
                    let (done, total) = progress.update(digest, done_bytes, total_bytes);
                    bar.set_length(total);
                    bar.set_position(done);
                }
                event @ (PullEvent::Done(_) | PullEvent::Failed { .. }) => {
                    outcome = Some(event);
                    break 'read;
                }
            }
        }
    }
    bar.finish_and_clear();
    match outcome {
        Some(PullEvent::Done(image)) => {
            println!(
                "{} {}",
                image["reference"].as_str().unwrap_or(reference),
                text(&image["digest"])
            );
            Ok(())
        }
        Some(PullEvent::Failed { code, message }) => {
            anyhow::bail!("pulling {reference}: {message} ({code})")
        }
        _ => anyhow::bail!("pulling {reference}: the server ended the stream without a result"),
    }
}

async fn list(client: &Client) -> anyhow::Result<()> {
    let images = client.list_images().await?;
    let rows = images
        .as_array()
        .map(|images| {
            images
                .iter()
                .map(|i| {
                    vec![
                        text(&i["reference"]),
                        short_digest(&text(&i["digest"])),
                        i["size_bytes"].as_u64().map_or_else(|| "-".to_owned(), human_size),
                        text(&i["created_at"]),
                    ]
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    print!("{}", crate::sandbox::table(&["REFERENCE", "DIGEST", "SIZE", "CREATED"], &rows));
    Ok(())
}

async fn import(client: &Client, file: &std::path::Path) -> anyhow::Result<()> {
    let handle = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let length = handle.metadata().await.ok().map(|m| m.len());
    let mut request = client
        .request(Method::POST, "/images/import")
        .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
        .body(reqwest::Body::wrap_stream(ReaderStream::with_capacity(handle, 256 * 1024)));
    if let Some(length) = length {
        request = request.header(reqwest::header::CONTENT_LENGTH, length);
    }
    let response = client.send(request).await?;
    let images: Value = response.json().await.context("invalid answer to the import")?;
    for image in images.as_array().into_iter().flatten() {
        println!("{} {}", text(&image["reference"]), text(&image["digest"]));
    }
    Ok(())
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::Null | Value::String(_) => "-".to_owned(),
        other => other.to_string(),
    }
}

/// `sha256:0123456789ab` from a full digest.
fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algorithm, hex)) => format!("{algorithm}:{}", &hex[..hex.len().min(12)]),
        None => digest.to_owned(),
    }
}

/// Bytes in the largest binary unit that keeps the number at least 1.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_progress_lines_parse() {
        assert_eq!(parse_event(br#"{"status":"resolving"}"#).unwrap(), PullEvent::Resolving);
        assert_eq!(
            parse_event(
                br#"{"status":"layer","digest":"sha256:ab","done_bytes":5,"total_bytes":10}"#
            )
            .unwrap(),
            PullEvent::Layer { digest: "sha256:ab".into(), done_bytes: 5, total_bytes: 10 }
        );
        assert_eq!(
            parse_event(
                br#"{"status":"error","error":{"code":"not_found","message":"no such image"}}"#
            )
            .unwrap(),
            PullEvent::Failed { code: "not_found".into(), message: "no such image".into() }
        );
        assert!(matches!(
            parse_event(br#"{"status":"done","image":{"reference":"r"}}"#).unwrap(),
            PullEvent::Done(_)
        ));
        assert_eq!(parse_event(br#"{"status":"later"}"#).unwrap(), PullEvent::Other);
        assert!(parse_event(b"not json").is_err());
    }

    #[test]
    fn progress_sums_the_latest_figures_of_every_layer() {
        let mut progress = Progress::default();
        assert_eq!(progress.update("a".into(), 5, 10), (5, 10));
        assert_eq!(progress.update("b".into(), 0, 20), (5, 30));
        assert_eq!(progress.update("a".into(), 10, 10), (10, 30));
    }

    #[test]
    fn sizes_and_digests_print_short() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(short_digest("sha256:0123456789abcdef"), "sha256:0123456789ab");
    }
}
