//! Request extractors whose every rejection is the JSON error envelope (never axum's plain text).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Longest pipeline, document, chunk or worker id accepted.
pub const MAX_ID_BYTES: usize = 512;

/// A JSON request body. Malformed JSON, a non-object body, missing fields and wrong types are all
/// 422 `validation_error` with serde's description (which names the field and position).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(body_rejection)?;
        parse_json(&bytes).map(JsonBody)
    }
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large("request body is larger than the sidecar's body limit")
    } else {
        ApiError::validation(format!("could not read the request body: {rejection}"))
    }
}

/// Parses a request body that must be a JSON object into `T`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => {
            return Err(ApiError::validation(
                "request body must be a JSON object; it is empty",
            ))
        }
        Some(b'{') => {}
        Some(_) => return Err(ApiError::validation("request body must be a JSON object")),
    }
    serde_json::from_slice(bytes).map_err(|err| {
        let what = match err.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "malformed JSON",
            serde_json::error::Category::Data => "invalid request body",
            serde_json::error::Category::Io => "unreadable request body",
        };
        ApiError::validation(format!("{what}: {err}"))
    })
}

/// Percent-decoded path parameters; a bad parameter is 422 JSON.
pub struct PathParams<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParams(value)),
            Err(rejection) => Err(ApiError::validation(format!(
                "invalid path parameter: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Checks an id taken from a path or a body: non-empty and at most `MAX_ID_BYTES` bytes.
pub fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::validation(format!("{what} must not be empty")));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(ApiError::validation(format!(
            "{what} is {} bytes; the limit is {MAX_ID_BYTES} bytes",
            id.len()
        )));
    }
    Ok(())
}

/// A raw request body; a read failure or an oversize body is the JSON envelope.
pub struct RawBody(pub Bytes);

impl<S> FromRequest<S> for RawBody
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(body_rejection)
    }
}
