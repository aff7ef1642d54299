//! Mints a device JWT and prints it (only the token, for scripting).
//!
//! ```text
//! mosaic-token --secret "$JWT_SECRET" --sub 6c1f...  --ttl 1h
//! mosaic-token --key device-signing.pem --kid k1 --aud mosaic --iss ops
//! ```

use std::time::Duration;

use clap::Parser;
use mosaic_tools::token::{self, KeySource, TokenSpec};
use uuid::Uuid;

/// Mint a device token (JWT) for the Mosaic gateway and print it on standard output.
///
/// The token's `sub` is the device UUID; the gateway accepts it when it is signed
/// with the gateway's HMAC secret (JWT_SECRET) or with a private key whose public key
/// is in the gateway's JWT_PUBLIC_KEYS, and when `aud`/`iss` match the gateway's
/// JWT_AUDIENCE/JWT_ISSUER if those are set.
///
/// Examples:
///
///   mosaic-token --secret "$JWT_SECRET" --sub 0b7c6a8e-3f55-4a8f-9d53-2f4ad1a1f001 --ttl 1h
///
///   mosaic-token --key device-signing.pem --kid 2026-01 --aud mosaic --iss provisioning
#[derive(Debug, Parser)]
#[command(name = "mosaic-token", version, verbatim_doc_comment)]
struct Args {
    /// The device UUID (`sub`); a random one when absent.
    #[arg(long)]
    sub: Option<Uuid>,
    #[command(flatten)]
    keys: KeySource,
    /// `kid` header: which of the gateway's keys verifies the token.
    #[arg(long)]
    kid: Option<String>,
    /// `aud` claim (must match the gateway's JWT_AUDIENCE when it is set).
    #[arg(long)]
    aud: Option<String>,
    /// `iss` claim (must match the gateway's JWT_ISSUER when it is set).
    #[arg(long)]
    iss: Option<String>,
    /// A group of the device (the `groups` claim); repeat for several. 1 to 64
    /// characters of A-Z, a-z, 0-9, `_` and `-`.
    #[arg(long = "group", value_name = "NAME", value_parser = parse_group)]
    groups: Vec<String>,
    /// Lifetime: 90s, 15m, 1h, 7d...
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: Duration,
    /// Print the device UUID on a second line (handy with a random --sub).
    #[arg(long)]
    print_sub: bool,
}

fn parse_group(s: &str) -> Result<String, String> {
    if mosaic_protocol::fleet::valid_group(s) {
        Ok(s.to_owned())
    } else {
        Err("1 to 64 characters of A-Z, a-z, 0-9, `_` and `-`".into())
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    match mosaic_tools::duration::parse(s) {
        Ok(d) if d >= Duration::from_secs(1) => Ok(d),
        Ok(_) => Err("the lifetime must be at least 1s".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> std::process::ExitCode {
    match run(mosaic_runtime::config::from_process()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let Some(signer) = args.keys.signer()? else {
        anyhow::bail!("give --secret, --secret-file or --key (see --help)");
    };
    let sub = args.sub.unwrap_or_else(Uuid::new_v4);
    let spec = TokenSpec {
        sub,
        ttl: args.ttl,
        kid: args.kid,
        aud: args.aud,
        iss: args.iss,
        groups: args.groups,
    };
    let mut out = token::mint(&signer, &spec)? + "\n";
    if args.print_sub {
        out.push_str(&format!("{sub}\n"));
    }
    // A closed pipe (`| head -1`) is not an error.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    Ok(())
}
