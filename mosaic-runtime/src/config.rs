//! Configuration from flags and environment, through an injectable source.
//!
//! Every setting is a clap argument with `env = "NAME"`. [`parse`] reads the variables
//! through a lookup function instead of the process environment, so tests pass a map
//! and never mutate the environment. A flag on the command line beats the variable.
//!
//! A bad setting becomes a [`ConfigError`] naming the variable; [`exit`] prints it as
//! one line and exits with code 64 (`EX_USAGE`).

use std::ffi::OsString;
use std::fmt;

use clap::{CommandFactory, Parser};

/// The log filter's variable, read by [`crate::telemetry::init_logs`] rather than by
/// a configuration field.
pub const LOG_FILTER_VAR: &str = "RUST_LOG";

/// Exit code for a bad configuration (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Exit code for a service that could not listen, or failed while running.
pub const EXIT_FAILURE: i32 = 1;

/// A setting that is missing or invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The environment variable (or flag) at fault.
    pub setting: String,
    /// What is wrong with it. Never contains the value of a secret.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid setting {}: {}", self.setting, self.message)
    }
}

impl ConfigError {
    /// A new error for `setting`.
    pub fn new(setting: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

/// What [`parse`] produced: a configuration, or a request to print something and exit 0.
#[derive(Debug)]
pub enum Parsed<C> {
    /// The configuration to run with.
    Run(C),
    /// `--help`, `--version` or `--print-settings`: print this and exit 0.
    Print(String),
}

/// Parses `C` from `args` (the first one is the program name) and from variables found
/// through `env`.
///
/// `--print-settings` prints the name of every environment variable the service reads,
/// one a line: those of `C`, then [`LOG_FILTER_VAR`] (deployment checks compare the
/// list with the manifests).
pub fn parse<C: Parser>(
    args: impl IntoIterator<Item = impl Into<OsString>>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Parsed<C>, ConfigError> {
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cmd = C::command();
    if args.iter().skip(1).any(|a| a == "--print-settings") {
        let mut names = settings::<C>();
        names.push(LOG_FILTER_VAR.to_owned());
        return Ok(Parsed::Print(names.join("\n") + "\n"));
    }
    // Values from the environment become flags, unless the flag was given already.
    let mut from_env = Vec::new();
    for arg in cmd.get_arguments() {
        let (Some(name), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let flag = format!("--{long}");
        let given = args.iter().skip(1).any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        });
        if given {
            continue;
        }
        if let Some(value) = env(&name.to_string_lossy()) {
            from_env.push(OsString::from(format!("{flag}={value}")));
        }
    }
    args.extend(from_env);
    let matches = match cmd.mut_args(|a| a.env(None)).try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            // Render help from the untouched command, so it names the variables.
            return Ok(Parsed::Print(C::command().render_long_help().to_string()));
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayVersion => {
            return Ok(Parsed::Print(e.render().to_string()));
        }
        Err(e) => return Err(to_config_error::<C>(e)),
    };
    C::from_arg_matches(&matches)
        .map(Parsed::Run)
        .map_err(to_config_error::<C>)
}

/// The environment variables `C` reads, in declaration order.
pub fn settings<C: CommandFactory>() -> Vec<String> {
    C::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect()
}

/// clap value parser for an AMQP URL setting: accepts what the AMQP client accepts.
/// The error never quotes the value, which holds a password.
pub fn amqp_url(value: &str) -> Result<String, String> {
    value
        .parse::<amq_protocol_uri::AMQPUri>()
        .map(|_| value.to_owned())
        .map_err(|_| {
            "not a valid AMQP URL (expected amqp://user:password@host:port/vhost, \
             the vhost percent-encoded)"
                .to_owned()
        })
}

/// Words that mark a published placeholder secret, compared after [`refuse_placeholder`]
/// folded the value to lowercase letters and digits.
const PLACEHOLDER_MARKERS: [&str; 3] = ["replaceme", "changeme", "placeholder"];

/// Refuses a secret that is a published placeholder, such as the `REPLACE-ME-...`
/// values of the repository's Kubernetes manifests or a `change-me` of an example:
/// those values are public, so a service running with one would accept anybody.
///
/// The value is folded to lowercase letters and digits before the comparison, so
/// `REPLACE-ME`, `replace_me`, `ReplaceMe` and `CHANGE ME` are all caught wherever
/// they appear in it. The error names `setting`, never the value.
pub fn refuse_placeholder(setting: &str, value: &str) -> Result<(), ConfigError> {
    let folded: String = value
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    match PLACEHOLDER_MARKERS.iter().find(|m| folded.contains(*m)) {
        Some(marker) => Err(ConfigError::new(
            setting,
            format!(
                "is a published placeholder (it contains \"{marker}\"); \
                 set a secret of your own, e.g. 32 random bytes in hex"
            ),
        )),
        None => Ok(()),
    }
}

/// Prints `err` as one line on stderr and exits with [`EXIT_CONFIG`].
pub fn exit(err: &ConfigError) -> ! {
    eprintln!("error: {err}");
    std::process::exit(EXIT_CONFIG)
}

/// Prints `err` as one line on stderr and exits with [`EXIT_FAILURE`]: for what
/// stops a service after its settings were accepted (it cannot listen, the server
/// failed).
pub fn fail(err: impl fmt::Display) -> ! {
    let line = err.to_string().replace('\n', " ");
    eprintln!("error: {line}");
    std::process::exit(EXIT_FAILURE)
}

/// Parses from the process's arguments and environment; prints and exits on
/// `--help`/`--print-settings` (code 0) and on a bad setting (code 64).
pub fn from_process<C: Parser>() -> C {
    match parse::<C>(std::env::args_os(), |name| std::env::var(name).ok()) {
        Ok(Parsed::Run(c)) => c,
        Ok(Parsed::Print(text)) => {
            print!("{text}");
            std::process::exit(0)
        }
        Err(e) => exit(&e),
    }
}

fn to_config_error<C: CommandFactory>(err: clap::Error) -> ConfigError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let arg = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => v.first().cloned(),
        _ => None,
    };
    // Map "--jwt-secret <JWT_SECRET>" back to the variable name.
    let setting = arg
        .as_deref()
        .and_then(|a| {
            let long = a.trim_start_matches('-').split([' ', '=']).next()?;
            C::command()
                .get_arguments()
                .find(|x| x.get_long() == Some(long))
                .and_then(|x| x.get_env().map(|e| e.to_string_lossy().into_owned()))
        })
        .or(arg)
        .unwrap_or_else(|| "arguments".to_owned());
    let message = match (err.kind(), err.get(ContextKind::InvalidValue)) {
        (ErrorKind::MissingRequiredArgument, _) => "required but not set".to_owned(),
        (_, Some(ContextValue::String(v))) if !is_secret(&setting) => {
            format!("{} (got {v:?})", first_line_reason(&err))
        }
        _ => first_line_reason(&err),
    };
    ConfigError::new(setting, message)
}

fn is_secret(setting: &str) -> bool {
    ["SECRET", "TOKEN", "PASSWORD", "KEY", "AMQP_URL"]
        .iter()
        .any(|s| setting.contains(s))
}

/// The reason part of a clap error, without the usage block and the value.
fn first_line_reason(err: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    if let Some(ContextValue::String(s)) = err.get(ContextKind::Custom) {
        return s.clone();
    }
    let rendered = err.render().to_string();
    let line = rendered.lines().next().unwrap_or("invalid value");
    let line = line.trim_start_matches("error: ");
    // clap says "invalid value 'x' for '--flag <NAME>': reason"; keep the reason.
    match line.rsplit_once("': ") {
        Some((_, reason)) => reason.to_owned(),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::SocketAddr;

    #[derive(Debug, Parser)]
    struct Demo {
        /// A URL with a password.
        #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", value_parser = amqp_url)]
        amqp_url: String,
        /// Address to listen on.
        #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
        listen_addr: SocketAddr,
        /// A secret.
        #[arg(long, env = "JWT_SECRET")]
        jwt_secret: Option<String>,
        /// A required one.
        #[arg(long, env = "HIVE_URL")]
        hive_url: String,
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn run(args: &[&str], vars: &[(&str, &str)]) -> Result<Demo, ConfigError> {
        match parse::<Demo>(
            std::iter::once("demo").chain(args.iter().copied()),
            env(vars),
        )? {
            Parsed::Run(d) => Ok(d),
            Parsed::Print(_) => panic!("unexpected print"),
        }
    }

    #[test]
    fn env_values_and_defaults() {
        let d = run(&[], &[("HIVE_URL", "http://h"), ("JWT_SECRET", "s")]).unwrap();
        assert_eq!(d.hive_url, "http://h");
        assert_eq!(d.jwt_secret.as_deref(), Some("s"));
        assert_eq!(d.listen_addr, "0.0.0.0:8080".parse().unwrap());
    }

    #[test]
    fn a_flag_beats_the_variable() {
        let d = run(&["--hive-url=http://flag"], &[("HIVE_URL", "http://env")]).unwrap();
        assert_eq!(d.hive_url, "http://flag");
    }

    #[test]
    fn missing_setting_is_named() {
        let e = run(&[], &[]).unwrap_err();
        assert_eq!(e.setting, "HIVE_URL");
        assert_eq!(
            e.to_string(),
            "invalid setting HIVE_URL: required but not set"
        );
    }

    #[test]
    fn invalid_setting_is_named_in_one_line() {
        let e = run(&[], &[("HIVE_URL", "x"), ("LISTEN_ADDR", "nowhere")]).unwrap_err();
        assert_eq!(e.setting, "LISTEN_ADDR");
        let line = e.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("nowhere"), "{line}");
    }

    #[test]
    fn a_bad_amqp_url_is_named_without_its_password() {
        for bad in ["amqp:guest:s3cret@rabbit", "http://guest:s3cret@rabbit/"] {
            let e = run(&[], &[("HIVE_URL", "x"), ("AMQP_URL", bad)]).unwrap_err();
            assert_eq!(e.setting, "AMQP_URL");
            let line = e.to_string();
            assert!(line.contains("not a valid AMQP URL"), "{line}");
            assert!(!line.contains("s3cret"), "{line}");
        }
        let ok = run(
            &[],
            &[("HIVE_URL", "x"), ("AMQP_URL", "amqp://u:p@h:5672/v")],
        )
        .unwrap();
        assert_eq!(ok.amqp_url, "amqp://u:p@h:5672/v");
    }

    #[test]
    fn published_placeholders_are_refused_without_quoting_them() {
        for value in [
            "REPLACE-ME-placeholder-jwt-hmac-secret-not-for-use",
            "replace_me_0123456789abcdef0123456789",
            "0123456789abcdef-ReplaceMe-0123456789abcdef",
            "change-me-to-a-long-random-value",
            "CHANGE ME PLEASE 0123456789abcdef",
            "my-PlaceHolder-secret-0123456789abcdef",
        ] {
            let e = refuse_placeholder("JWT_SECRET", value).unwrap_err();
            assert_eq!(e.setting, "JWT_SECRET");
            let line = e.to_string();
            assert!(line.contains("placeholder"), "{line}");
            assert!(!line.contains(value), "{line}");
            assert!(!line.contains('\n'), "{line}");
        }
        for value in [
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "mosaic-test-secret-0123456789-abcdefghij",
            "examples-test-jwt-secret-0123456789abcdef",
            "replace-m3-0123456789abcdef",
        ] {
            refuse_placeholder("JWT_SECRET", value).unwrap();
        }
    }

    #[test]
    fn print_settings_lists_env_names() {
        let out = parse::<Demo>(["demo", "--print-settings"], env(&[])).unwrap();
        let Parsed::Print(text) = out else { panic!() };
        assert_eq!(
            text,
            "AMQP_URL\nLISTEN_ADDR\nJWT_SECRET\nHIVE_URL\nRUST_LOG\n"
        );
    }
}
