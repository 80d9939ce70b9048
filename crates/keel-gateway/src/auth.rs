//! Per-route authentication: API keys and JWTs (HS256 and RS256; `exp`, `nbf`, `aud` and `iss`
//! checked), via the `jsonwebtoken` crate. A request passes with a valid API key *or* a valid
//! bearer token, whichever the route configures. Chosen claims of a valid token are forwarded
//! as headers; the same headers sent by the client are always removed first, so they cannot be
//! forged.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue, header};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::headers::Lookup;
use serde::Deserialize;

/// `auth = { ... }` on a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted API keys.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Header carrying the API key.
    #[serde(default = "default_key_header")]
    pub api_key_header: String,
    /// Bearer tokens (`Authorization: Bearer <jwt>`).
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

fn default_key_header() -> String {
    "x-api-key".into()
}

/// JWT settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256` or `RS256`.
    pub algorithm: String,
    /// The shared secret (HS256).
    #[serde(default)]
    pub secret: Option<String>,
    /// The public key in PEM (RS256).
    #[serde(default)]
    pub public_key_pem: Option<String>,
    /// Required `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    #[serde(default)]
    pub leeway_s: u64,
    /// Claim → header to forward it in.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
}

struct Jwt {
    key: DecodingKey,
    validation: Validation,
}

/// A route's authentication, compiled.
pub(crate) struct Auth {
    api_keys: Vec<Vec<u8>>,
    api_key_header: HeaderName,
    jwt: Option<Jwt>,
    forward: Vec<(String, HeaderName)>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("api_keys", &self.api_keys.len())
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    /// Compiles the settings; a bad key or algorithm is an error naming it.
    pub(crate) fn new(config: &AuthConfig) -> Result<Auth, String> {
        let api_key_header = HeaderName::from_bytes(config.api_key_header.as_bytes())
            .map_err(|_| format!("{:?} is not a header name", config.api_key_header))?;
        let jwt = match &config.jwt {
            None => None,
            Some(j) => {
                let (algorithm, key) = match j.algorithm.as_str() {
                    "HS256" => {
                        let secret = j.secret.as_deref().ok_or("HS256 needs a secret")?;
                        (
                            Algorithm::HS256,
                            DecodingKey::from_secret(secret.as_bytes()),
                        )
                    }
                    "RS256" => {
                        let pem = j
                            .public_key_pem
                            .as_deref()
                            .ok_or("RS256 needs public_key_pem")?;
                        let key = DecodingKey::from_rsa_pem(pem.as_bytes())
                            .map_err(|e| format!("public_key_pem: {e}"))?;
                        (Algorithm::RS256, key)
                    }
                    other => return Err(format!("JWT algorithm {other:?}: use HS256 or RS256")),
                };
                let mut validation = Validation::new(algorithm);
                validation.leeway = j.leeway_s;
                validation.validate_nbf = true;
                match &j.audience {
                    Some(aud) => validation.set_audience(&[aud]),
                    None => validation.validate_aud = false,
                }
                if let Some(iss) = &j.issuer {
                    validation.set_issuer(&[iss]);
                }
                Some(Jwt { key, validation })
            }
        };
        let forward = config
            .jwt
            .iter()
            .flat_map(|j| j.forward_claims.iter())
            .map(|(claim, h)| {
                HeaderName::from_bytes(h.as_bytes())
                    .map(|name| (claim.clone(), name))
                    .map_err(|_| format!("{h:?} is not a header name"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Auth {
            api_keys: config
                .api_keys
                .iter()
                .map(|k| k.as_bytes().to_vec())
                .collect(),
            api_key_header,
            jwt,
            forward,
        })
    }

    /// The headers claims are forwarded in: whatever the client sent in them is dropped.
    pub(crate) fn claim_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.forward.iter().map(|(_, name)| name)
    }

    /// Checks a request's credentials; on success, the claim headers to forward (the
    /// client's own headers of those names must be dropped: see [`Auth::claim_headers`]).
    pub(crate) fn verify(
        &self,
        headers: &(impl Lookup + ?Sized),
    ) -> Result<Vec<(&HeaderName, HeaderValue)>, String> {
        if let Some(key) = headers.value(&self.api_key_header)
            && self.api_keys.iter().any(|k| constant_time_eq(k, key))
        {
            return Ok(Vec::new());
        }
        static AUTHORIZATION: HeaderName = header::AUTHORIZATION;
        let bearer = headers
            .value(&AUTHORIZATION)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let (Some(jwt), Some(token)) = (&self.jwt, bearer) else {
            return Err(if self.jwt.is_some() {
                "send a valid API key or `Authorization: Bearer <token>`".into()
            } else {
                format!("send a valid API key in {}", self.api_key_header)
            });
        };
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token.trim(),
            &jwt.key,
            &jwt.validation,
        )
        .map_err(|e| format!("token refused: {e}"))?;
        let mut claims = Vec::with_capacity(self.forward.len());
        for (claim, name) in &self.forward {
            let value = match data.claims.get(claim) {
                Some(serde_json::Value::String(s)) => HeaderValue::from_str(s),
                Some(other) => HeaderValue::from_str(&other.to_string()),
                None => continue,
            };
            if let Ok(v) = value {
                claims.push((name, v));
            }
        }
        Ok(claims)
    }
}
