//! Requests the sidecar sends to Turbopuffer through the gateway's own listener (so every write is
//! validated, stamped and mirrored like a client's).

use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hevlayer_sidecar_api::RELAYED_UPSTREAM_HEADERS;

use crate::config::GatewayUrl;
use crate::error::ApiError;

/// What the sidecar's requests to the gateway say they are (the watermark poller's included).
pub const USER_AGENT: &str = concat!("hevlayer-sidecar/", env!("CARGO_PKG_VERSION"));

pub struct Gateway {
    base: String,
    api_key: Option<String>,
    client: reqwest::Client,
}

/// An answer from the gateway.
#[derive(Debug)]
pub struct GatewayResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl GatewayResponse {
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// Relays this (error) answer verbatim: status, body, content type and the retry headers.
    pub fn relay(&self) -> Response {
        let mut response = (self.status, self.body.clone()).into_response();
        let headers = response.headers_mut();
        if let Some(ct) = self.headers.get(header::CONTENT_TYPE) {
            headers.insert(header::CONTENT_TYPE, ct.clone());
        }
        for name in RELAYED_UPSTREAM_HEADERS {
            if let Some(value) = self.headers.get(name) {
                headers.insert(HeaderName::from_static(name), value.clone());
            }
        }
        response
    }
}

/// Percent-encodes one path segment.
pub fn encode_segment(segment: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

impl Gateway {
    pub fn new(url: &GatewayUrl, api_key: Option<String>, timeout: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .no_proxy()
            .build()
            .map_err(|e| format!("could not build the gateway HTTP client: {e}"))?;
        Ok(Self {
            base: url.base.clone(),
            api_key,
            client,
        })
    }

    /// The `authorization` value to present: the caller's bearer when the filter forwarded one
    /// (passthrough mode), else the sidecar's configured key.
    pub fn authorization(&self, caller: Option<&HeaderValue>) -> Result<HeaderValue, ApiError> {
        if let Some(value) = caller {
            if value
                .to_str()
                .is_ok_and(|v| v.starts_with("Bearer ") && v.len() > "Bearer ".len())
            {
                return Ok(value.clone());
            }
        }
        match &self.api_key {
            Some(key) => HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| ApiError::unauthorized("the configured GATEWAY_API_KEY is not a valid header value")),
            None => Err(ApiError::unauthorized(
                "no bearer to present to the gateway: the request carried none and GATEWAY_API_KEY is not set",
            )),
        }
    }

    /// `POST {base}{path}` with a JSON body.
    pub async fn post_json(
        &self,
        path: &str,
        body: Vec<u8>,
        authorization: HeaderValue,
        request_id: Option<&HeaderValue>,
    ) -> Result<GatewayResponse, ApiError> {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, authorization)
            .body(body);
        if let Some(id) = request_id {
            request = request.header("x-request-id", id.clone());
        }
        collect(request.send().await).await
    }

    /// `GET {base}/v1/namespaces/{namespace}/metadata` within `timeout`.
    pub async fn get_metadata(
        &self,
        namespace: &str,
        authorization: HeaderValue,
        timeout: Duration,
    ) -> Result<GatewayResponse, ApiError> {
        let url = format!(
            "{}/v1/namespaces/{}/metadata",
            self.base,
            encode_segment(namespace)
        );
        let sent = self
            .client
            .get(url)
            .header(header::AUTHORIZATION, authorization)
            .timeout(timeout)
            .send()
            .await;
        collect(sent).await
    }
}

/// Reads a whole answer (status, headers, body), or the error that stopped it.
async fn collect(sent: Result<reqwest::Response, reqwest::Error>) -> Result<GatewayResponse, ApiError> {
    let response = sent.map_err(transport_error)?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(transport_error)?;
    Ok(GatewayResponse {
        status,
        headers,
        body,
    })
}

fn transport_error(err: reqwest::Error) -> ApiError {
    if err.is_timeout() {
        ApiError::timeout("the gateway did not answer in time; the write may or may not have applied")
    } else {
        let mut reason = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        ApiError::upstream(format!("could not reach the gateway: {reason}"))
    }
}
