//! The TOML configuration file, validated before anything starts.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration problem: names the key and how to fix it (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The offending key, as a dotted path (`batch.max_rows`, `channels[1].secret`).
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ConfigError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration of one walpush instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// From the file; the command line and the environment take precedence (see `cli`).
    pub database_url: Option<String>,
    /// Logical replication slot name.
    pub slot: String,
    /// Publication on `walpush.outbox`.
    pub publication: String,
    /// When batches close.
    pub batch: BatchConfig,
    /// Backoff for failed deliveries.
    pub retry: RetryConfig,
    /// The health and metrics listener.
    pub http: HttpConfig,
    /// Configured channels, in file order.
    pub channels: Vec<ChannelConfig>,
}

/// `[batch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A batch closes at this many outbox rows.
    pub max_rows: usize,
    /// ... or this long after its first row.
    pub max_wait_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_rows: 1000,
            max_wait_ms: 10,
        }
    }
}

impl BatchConfig {
    /// `max_wait_ms` as a duration.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Sends tried before a delivery is dead.
    pub max_attempts: u32,
    /// Backoff after the first failed attempt.
    pub initial_backoff_ms: u64,
    /// Upper bound of the backoff.
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 8,
            initial_backoff_ms: 500,
            max_backoff_ms: 300_000,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Address for `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
    /// Whether the file named the address (a failed bind is then fatal).
    pub explicit: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9187)),
            explicit: false,
        }
    }
}

/// One `[[channels]]` entry.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// The name devices refer to (`walpush.devices.channel`).
    pub name: String,
    /// Kind-specific settings.
    pub kind: ChannelKind,
}

/// The settings of each channel kind.
#[derive(Debug, Clone)]
pub enum ChannelKind {
    /// Standard Webhooks.
    Webhook(WebhookConfig),
    /// Apple Push Notification service.
    Apns(ApnsConfig),
    /// Firebase Cloud Messaging HTTP v1.
    Fcm(FcmConfig),
    /// Web Push (RFC 8030/8291/8292).
    WebPush(WebPushConfig),
    /// E-mail over SMTP: accepted in the file, not delivered by this build.
    Email(EmailConfig),
    /// NATS JetStream: accepted in the file, not delivered by this build.
    Nats(NatsConfig),
}

impl ChannelKind {
    /// The `kind` value in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            ChannelKind::Webhook(_) => "webhook",
            ChannelKind::Apns(_) => "apns",
            ChannelKind::Fcm(_) => "fcm",
            ChannelKind::WebPush(_) => "webpush",
            ChannelKind::Email(_) => "email",
            ChannelKind::Nats(_) => "nats",
        }
    }
}

/// `kind = "webhook"`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `whsec_` followed by the base64 key.
    pub secret: String,
    /// Above 1 the body is a JSON array of events.
    #[serde(default = "one")]
    pub max_events_per_request: usize,
    /// Per request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests in flight at once for this channel.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Extra trusted root certificate (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &"<redacted>")
            .field("max_events_per_request", &self.max_events_per_request)
            .field("timeout_ms", &self.timeout_ms)
            .field("concurrency", &self.concurrency)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// `kind = "apns"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    /// Base URL, `https://api.push.apple.com` by default.
    #[serde(default = "default_apns_endpoint")]
    pub endpoint: String,
    /// The `.p8` token-signing key.
    pub key_file: PathBuf,
    /// The key's id (JWT `kid`).
    pub key_id: String,
    /// The team id (JWT `iss`).
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// Extra trusted root certificate (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Per request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

/// `kind = "fcm"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// Service-account JSON; its `token_uri` and `project_id` are used.
    pub service_account_file: PathBuf,
    /// Base URL, `https://fcm.googleapis.com` by default.
    #[serde(default = "default_fcm_endpoint")]
    pub endpoint: String,
    /// Extra trusted root certificate (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Per request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

/// `kind = "webpush"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebPushConfig {
    /// PEM (PKCS#8 or SEC1) P-256 private key for VAPID.
    pub vapid_private_key_file: PathBuf,
    /// VAPID `sub`: a `mailto:` or `https:` contact.
    pub subject: String,
    /// Extra trusted root certificate (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Per request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

/// `kind = "email"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `smtp://host:port` or `smtps://...`.
    pub smtp_url: String,
    /// The `From` header.
    pub from: String,
}

/// `kind = "nats"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://host:port`.
    pub url: String,
    /// Subject template, e.g. `walpush.{topic}`.
    pub subject: String,
}

fn one() -> usize {
    1
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_concurrency() -> usize {
    64
}
fn default_apns_endpoint() -> String {
    "https://api.push.apple.com".to_owned()
}
fn default_fcm_endpoint() -> String {
    "https://fcm.googleapis.com".to_owned()
}

/// The file as written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database_url: Option<String>,
    slot: Option<String>,
    publication: Option<String>,
    #[serde(default)]
    batch: BatchConfig,
    #[serde(default)]
    retry: RetryConfig,
    http: Option<RawHttp>,
    #[serde(default)]
    channels: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: None,
            slot: "walpush".to_owned(),
            publication: "walpush".to_owned(),
            batch: BatchConfig::default(),
            retry: RetryConfig::default(),
            http: HttpConfig::default(),
            channels: Vec::new(),
        }
    }
}

impl Config {
    /// Reads and validates a file. Relative paths inside it are resolved against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            ConfigError::new("--config", format!("cannot read {}: {err}", path.display()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base)
    }

    /// Parses and validates TOML text; `base` resolves relative file paths.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(toml_error)?;
        let mut config = Config {
            database_url: raw.database_url,
            slot: raw.slot.unwrap_or_else(|| "walpush".to_owned()),
            publication: raw.publication.unwrap_or_else(|| "walpush".to_owned()),
            batch: raw.batch,
            retry: raw.retry,
            http: HttpConfig::default(),
            channels: Vec::new(),
        };
        if let Some(http) = raw.http {
            if let Some(listen) = http.listen {
                config.http.listen = listen.parse().map_err(|_| {
                    ConfigError::new(
                        "http.listen",
                        format!("{listen:?} is not an address: write it as \"127.0.0.1:9187\""),
                    )
                })?;
                config.http.explicit = true;
            }
        }
        for (index, table) in raw.channels.into_iter().enumerate() {
            config.channels.push(parse_channel(index, table, base)?);
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url {
            check_database_url("database_url", url)?;
        }
        check_identifier("slot", &self.slot)?;
        check_identifier("publication", &self.publication)?;
        if self.batch.max_rows == 0 {
            return Err(ConfigError::new("batch.max_rows", "must be at least 1"));
        }
        if self.batch.max_wait_ms > 60_000 {
            return Err(ConfigError::new(
                "batch.max_wait_ms",
                "must be at most 60000 (one minute)",
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(ConfigError::new("retry.max_attempts", "must be at least 1"));
        }
        if self.retry.initial_backoff_ms == 0 {
            return Err(ConfigError::new(
                "retry.initial_backoff_ms",
                "must be at least 1",
            ));
        }
        if self.retry.max_backoff_ms < self.retry.initial_backoff_ms {
            return Err(ConfigError::new(
                "retry.max_backoff_ms",
                "must not be below retry.initial_backoff_ms",
            ));
        }
        let mut names = BTreeSet::new();
        for (index, channel) in self.channels.iter().enumerate() {
            if !names.insert(channel.name.as_str()) {
                return Err(ConfigError::new(
                    format!("channels[{index}].name"),
                    format!(
                        "{:?} is used by an earlier channel: names must be unique",
                        channel.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a PostgreSQL URL (`postgres://user@host:port/db`) without echoing its password.
pub fn check_database_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let parsed: Result<tokio_postgres::Config, _> = url.parse();
    match parsed {
        Ok(cfg) if cfg.get_hosts().is_empty() => Err(ConfigError::new(
            key,
            "names no host: write it as postgres://user@host:port/database",
        )),
        Ok(_) => Ok(()),
        Err(_) => Err(ConfigError::new(
            key,
            "is not a PostgreSQL URL: write it as postgres://user@host:port/database",
        )),
    }
}

fn check_identifier(key: &str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !value.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!("{value:?} is not a valid name: use 1-63 lowercase letters, digits and _"),
        ))
    }
}

fn toml_error(err: toml::de::Error) -> ConfigError {
    // serde names the field in its message (`unknown field `x``, `missing field `y``);
    // the key path is the table the error points into.
    let message = err.message().trim().to_owned();
    let key = field_in(&message).unwrap_or_else(|| "config".to_owned());
    let location = err
        .span()
        .map(|span| format!(" (at byte {})", span.start))
        .unwrap_or_default();
    ConfigError::new(key, format!("{message}{location}"))
}

fn field_in(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

fn parse_channel(
    index: usize,
    mut table: toml::Table,
    base: &Path,
) -> Result<ChannelConfig, ConfigError> {
    let at = |key: &str| format!("channels[{index}].{key}");
    let name = match table.remove("name") {
        Some(toml::Value::String(name)) if !name.trim().is_empty() => name,
        Some(_) => return Err(ConfigError::new(at("name"), "must be a non-empty string")),
        None => {
            return Err(ConfigError::new(
                at("name"),
                "is required, e.g. name = \"hooks\"",
            ))
        }
    };
    let kind = match table.remove("kind") {
        Some(toml::Value::String(kind)) => kind,
        Some(_) => return Err(ConfigError::new(at("kind"), "must be a string")),
        None => {
            return Err(ConfigError::new(
                at("kind"),
                "is required: one of webhook, apns, fcm, webpush, email, nats",
            ))
        }
    };
    let value = toml::Value::Table(table);
    let wrap = |err: toml::de::Error| {
        let message = err.message().trim().to_owned();
        let key = field_in(&message).map_or_else(|| at("kind"), |field| at(&field));
        ConfigError::new(key, format!("{message} (channel {name:?}, kind {kind:?})"))
    };
    let kind = match kind.as_str() {
        "webhook" => {
            let mut cfg: WebhookConfig = value.try_into().map_err(wrap)?;
            check_webhook(&cfg, &at)?;
            cfg.ca_file = cfg.ca_file.as_deref().map(|p| resolve(base, p));
            ChannelKind::Webhook(cfg)
        }
        "apns" => {
            let mut cfg: ApnsConfig = value.try_into().map_err(wrap)?;
            check_common(&at, &cfg.endpoint, cfg.timeout_ms, cfg.concurrency)?;
            cfg.key_file = resolve(base, &cfg.key_file);
            check_file(&at("key_file"), &cfg.key_file)?;
            cfg.ca_file = cfg.ca_file.as_deref().map(|p| resolve(base, p));
            if cfg.topic.is_empty() {
                return Err(ConfigError::new(at("topic"), "must be the app's bundle id"));
            }
            ChannelKind::Apns(cfg)
        }
        "fcm" => {
            let mut cfg: FcmConfig = value.try_into().map_err(wrap)?;
            check_common(&at, &cfg.endpoint, cfg.timeout_ms, cfg.concurrency)?;
            cfg.service_account_file = resolve(base, &cfg.service_account_file);
            check_file(&at("service_account_file"), &cfg.service_account_file)?;
            cfg.ca_file = cfg.ca_file.as_deref().map(|p| resolve(base, p));
            ChannelKind::Fcm(cfg)
        }
        "webpush" => {
            let mut cfg: WebPushConfig = value.try_into().map_err(wrap)?;
            check_common(&at, "https://localhost", cfg.timeout_ms, cfg.concurrency)?;
            cfg.vapid_private_key_file = resolve(base, &cfg.vapid_private_key_file);
            check_file(&at("vapid_private_key_file"), &cfg.vapid_private_key_file)?;
            cfg.ca_file = cfg.ca_file.as_deref().map(|p| resolve(base, p));
            if !(cfg.subject.starts_with("mailto:") || cfg.subject.starts_with("https:")) {
                return Err(ConfigError::new(
                    at("subject"),
                    "must be a mailto: or https: contact, e.g. \"mailto:ops@example.com\"",
                ));
            }
            ChannelKind::WebPush(cfg)
        }
        "email" => {
            let cfg: EmailConfig = value.try_into().map_err(wrap)?;
            check_url(&at("smtp_url"), &cfg.smtp_url, &["smtp", "smtps"])?;
            if cfg.from.trim().is_empty() {
                return Err(ConfigError::new(at("from"), "must be a sender address"));
            }
            ChannelKind::Email(cfg)
        }
        "nats" => {
            let cfg: NatsConfig = value.try_into().map_err(wrap)?;
            check_url(&at("url"), &cfg.url, &["nats", "tls"])?;
            if cfg.subject.trim().is_empty() {
                return Err(ConfigError::new(
                    at("subject"),
                    "must be a subject, e.g. walpush.{topic}",
                ));
            }
            ChannelKind::Nats(cfg)
        }
        other => {
            return Err(ConfigError::new(
                at("kind"),
                format!(
                    "unknown channel kind {other:?}: use one of webhook, apns, fcm, webpush, \
                     email, nats"
                ),
            ))
        }
    };
    if let Some(ca) = ca_file_of(&kind) {
        check_file(&at("ca_file"), ca)?;
    }
    Ok(ChannelConfig { name, kind })
}

fn ca_file_of(kind: &ChannelKind) -> Option<&PathBuf> {
    match kind {
        ChannelKind::Webhook(c) => c.ca_file.as_ref(),
        ChannelKind::Apns(c) => c.ca_file.as_ref(),
        ChannelKind::Fcm(c) => c.ca_file.as_ref(),
        ChannelKind::WebPush(c) => c.ca_file.as_ref(),
        ChannelKind::Email(_) | ChannelKind::Nats(_) => None,
    }
}

fn check_webhook(cfg: &WebhookConfig, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    use base64::Engine as _;
    let key = cfg.secret.strip_prefix("whsec_").ok_or_else(|| {
        ConfigError::new(
            at("secret"),
            "must start with whsec_ followed by a base64 key (Standard Webhooks)",
        )
    })?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(bytes) if !bytes.is_empty() => {}
        _ => {
            return Err(ConfigError::new(
                at("secret"),
                "after whsec_ must come a non-empty base64 key",
            ))
        }
    }
    if cfg.max_events_per_request == 0 {
        return Err(ConfigError::new(
            at("max_events_per_request"),
            "must be at least 1",
        ));
    }
    check_common(at, "https://localhost", cfg.timeout_ms, cfg.concurrency)
}

fn check_common(
    at: &dyn Fn(&str) -> String,
    endpoint: &str,
    timeout_ms: u64,
    concurrency: usize,
) -> Result<(), ConfigError> {
    match url::Url::parse(endpoint) {
        Ok(url) if url.scheme() == "https" || url.scheme() == "http" => {}
        _ => {
            return Err(ConfigError::new(
                at("endpoint"),
                format!("{endpoint:?} is not an http(s) URL"),
            ))
        }
    }
    if timeout_ms == 0 {
        return Err(ConfigError::new(at("timeout_ms"), "must be at least 1"));
    }
    if concurrency == 0 {
        return Err(ConfigError::new(at("concurrency"), "must be at least 1"));
    }
    Ok(())
}

fn check_url(key: &str, value: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(url) if schemes.contains(&url.scheme()) => Ok(()),
        _ => Err(ConfigError::new(
            key,
            format!("is not a {} URL", schemes.join(" or ")),
        )),
    }
}

fn check_file(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!("{} does not exist or is not a file", path.display()),
        ))
    }
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOOK: &str = r#"
        [[channels]]
        name = "hooks"
        kind = "webhook"
        secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("."))
    }

    #[test]
    fn defaults_follow_the_design() {
        let config = parse(HOOK).unwrap();
        assert_eq!(config.slot, "walpush");
        assert_eq!(config.batch.max_rows, 1000);
        assert_eq!(config.batch.max_wait_ms, 10);
        assert_eq!(config.retry.max_attempts, 8);
        assert_eq!(config.http.listen.port(), 9187);
        assert!(!config.http.explicit);
        match &config.channels[0].kind {
            ChannelKind::Webhook(w) => {
                assert_eq!(w.max_events_per_request, 1);
                assert_eq!(w.concurrency, 64);
            }
            other => panic!("unexpected kind {other:?}"),
        }
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let err = parse("max_rowz = 3\n").unwrap_err();
        assert_eq!(err.key, "max_rowz");
    }

    #[test]
    fn unknown_key_in_a_section_is_named() {
        let err = parse("[batch]\nmax_rowz = 3\n").unwrap_err();
        assert_eq!(err.key, "max_rowz");
    }

    #[test]
    fn unknown_channel_kind_is_named() {
        let err = parse("[[channels]]\nname = \"x\"\nkind = \"pigeon\"\n").unwrap_err();
        assert_eq!(err.key, "channels[0].kind");
        assert!(err.message.contains("pigeon"));
    }

    #[test]
    fn missing_secret_is_named() {
        let err = parse("[[channels]]\nname = \"x\"\nkind = \"webhook\"\n").unwrap_err();
        assert_eq!(err.key, "channels[0].secret");
    }

    #[test]
    fn unknown_channel_key_is_named() {
        let text = format!("{HOOK}\ncolour = 3\n");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "channels[0].colour");
    }

    #[test]
    fn bad_secret_does_not_echo_it() {
        let text = HOOK.replace("whsec_", "sk_");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "channels[0].secret");
        assert!(!err.to_string().contains("MfKQ9r8G"));
    }

    #[test]
    fn bad_database_url_is_named_without_password() {
        let err = parse("database_url = \"mysql:/x:hunter2@\"\n").unwrap_err();
        assert_eq!(err.key, "database_url");
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn duplicate_channel_names_are_refused() {
        let text = format!("{HOOK}{HOOK}");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "channels[1].name");
    }

    #[test]
    fn zero_batch_rows_is_refused() {
        let err = parse("[batch]\nmax_rows = 0\n").unwrap_err();
        assert_eq!(err.key, "batch.max_rows");
    }

    #[test]
    fn the_shipped_example_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let config = Config::load(&dir.join("walpush.toml")).unwrap();
        assert_eq!(config.channels.len(), 1);
        assert_eq!(config.http.listen.port(), 9187);
    }

    #[test]
    fn email_and_nats_channels_of_the_design_parse() {
        let text = "[[channels]]\nname = \"mail\"\nkind = \"email\"\n\
                    smtp_url = \"smtp://127.0.0.1:2525\"\nfrom = \"Ex <no@example.com>\"\n\
                    [[channels]]\nname = \"bus\"\nkind = \"nats\"\n\
                    url = \"nats://127.0.0.1:4222\"\nsubject = \"walpush.{topic}\"\n";
        let config = parse(text).unwrap();
        assert_eq!(config.channels[0].kind.as_str(), "email");
        assert_eq!(config.channels[1].kind.as_str(), "nats");
        let err = parse(&text.replace("smtp://", "http://")).unwrap_err();
        assert_eq!(err.key, "channels[0].smtp_url");
    }

    #[test]
    fn bad_listen_address_is_named() {
        let err = parse("[http]\nlisten = \"nowhere\"\n").unwrap_err();
        assert_eq!(err.key, "http.listen");
    }
}
