//! `namespace-credential` subcommands: mint a namespace credential with the keys of
//! `--token-signing-key-file` (what the webhook does, for operators and tests), and list the
//! namespaces whose credentials a running registry accepted.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use outpost_core::nscred;
use outpost_core::{KeyFileError, RepositoryPattern, SigningKeys};

use super::CliError;
use super::admin::{self, AdminArgs};
use crate::auth::namespace::SeenCredential;
use crate::config::parse_duration;

#[derive(clap::Subcommand, Debug)]
#[command(after_help = "Example:\n  \
    outpost-registry namespace-credential mint --namespace team-a \\\n      \
    --repositories 'team-a/**,base/*' --ttl 8h --token-signing-key-file keys.txt")]
pub enum NamespaceCredentialCommand {
    /// Print a new credential for a namespace (the password of its pull secret; the
    /// username is the namespace).
    Mint {
        /// The Kubernetes namespace.
        #[arg(long)]
        namespace: String,
        /// Repository patterns it may pull, comma-separated (`*` within a segment, `**`
        /// across).
        #[arg(long, value_delimiter = ',', required = true)]
        repositories: Vec<String>,
        /// How long it is valid (s, m, h or d suffix).
        #[arg(long, default_value = "8h", value_parser = parse_duration)]
        ttl: Duration,
        /// The registry's key file; the first key signs.
        #[arg(long, env = "OUTPOST_TOKEN_SIGNING_KEY_FILE")]
        token_signing_key_file: PathBuf,
    },
    /// List the namespaces whose credentials the registry accepted since it started.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: super::tokens::Output,
    },
}

pub async fn run(cmd: NamespaceCredentialCommand) -> Result<ExitCode, CliError> {
    match cmd {
        NamespaceCredentialCommand::Mint {
            namespace,
            repositories,
            ttl,
            token_signing_key_file: path,
        } => {
            let text = std::fs::read_to_string(&path).map_err(|source| KeyFileError::Read {
                path: path.display().to_string(),
                source,
            });
            let keys = text
                .and_then(|t| SigningKeys::parse(&path, &t))
                .map_err(|e| CliError::Admin(e.to_string()))?;
            let patterns = repositories
                .iter()
                .map(|r| r.trim().parse::<RepositoryPattern>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CliError::Admin(e.to_string()))?;
            let now = crate::auth::bearer::now_secs();
            let cred = nscred::mint(&keys, &namespace, &patterns, now, now + ttl.as_secs())
                .map_err(|e| CliError::Admin(e.to_string()))?;
            println!("{cred}");
            Ok(ExitCode::SUCCESS)
        }
        NamespaceCredentialCommand::List { admin, output } => {
            let seen = admin::namespace_credentials(&admin).await?;
            print_seen(&seen, output);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints the namespaces as `token list` and `namespace-credential list` show them.
pub fn print_seen(seen: &[SeenCredential], output: super::tokens::Output) {
    match output {
        super::tokens::Output::Json => {
            println!("{}", serde_json::json!(seen));
        }
        super::tokens::Output::Text => {
            println!(
                "{:<30} {:<40} {:<16} {:<20} LAST ACCEPTED",
                "NAMESPACE", "REPOSITORIES", "KEY ID", "EXPIRES"
            );
            for s in seen {
                println!(
                    "{:<30} {:<40} {:<16} {:<20} {}",
                    s.namespace,
                    s.repositories.join(","),
                    s.kid,
                    crate::api::access::rfc3339(s.expires_at),
                    crate::api::access::rfc3339(s.last_accepted)
                );
            }
        }
    }
}
