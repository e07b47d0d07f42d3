//! `scope-map` and `token` subcommands, in the shape of `az acr scope-map` and `az acr token`.
//! They edit the tokens file atomically; a running registry picks the change up by itself.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::auth::Action;
use crate::auth::tokens::{
    ScopeMapEntry, TokenEntry, TokensError, TokensFile, generate_password, hash_password,
    rules_from_args, valid_name,
};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Status {
    Enabled,
    Disabled,
}

#[derive(Args, Debug)]
pub struct TokensArg {
    /// The tokens file to edit (created if missing).
    #[arg(long, env = "OUTPOST_TOKENS")]
    pub tokens: PathBuf,
}

#[derive(Subcommand, Debug)]
#[command(after_help = "Examples:\n  \
    outpost-registry scope-map create --tokens tokens.toml --name team-a-pull \\\n      \
    --repository 'team-a/**' content/read metadata/read\n  \
    outpost-registry scope-map update --tokens tokens.toml --name team-a-pull \\\n      \
    --add-repository shared/base content/read\n  \
    outpost-registry scope-map list --tokens tokens.toml")]
pub enum ScopeMapCommand {
    /// Create a scope map: which actions on which repositories.
    Create {
        #[command(flatten)]
        file: TokensArg,
        /// Scope map name (1-50 of A-Z a-z 0-9 - _).
        #[arg(long)]
        name: String,
        /// A repository pattern and its actions; repeat for more (`*` within a segment,
        /// `**` across). Actions: content/read content/write content/delete metadata/read
        /// metadata/write, and message/write on `gateway/<connected registry name>` (see
        /// --gateway).
        #[arg(long = "repository", num_args = 2.., value_names = ["REPO", "ACTION"], required = true, action = clap::ArgAction::Append)]
        repository: Vec<String>,
        /// A connected registry (its ConnectedRegistryName) whose sync token this scope map
        /// is for: adds `gateway/<NAME> message/write`, so that child may report its state
        /// to this registry (`connected-registry list`). Repeatable.
        #[arg(long = "gateway", value_name = "NAME", action = clap::ArgAction::Append)]
        gateway: Vec<String>,
        /// Free text shown by `list`.
        #[arg(long)]
        description: Option<String>,
    },
    /// Add or remove repository actions of a scope map.
    Update {
        #[command(flatten)]
        file: TokensArg,
        #[arg(long)]
        name: String,
        /// Grant actions on a repository pattern (repeatable).
        #[arg(long = "add-repository", num_args = 2.., value_names = ["REPO", "ACTION"], action = clap::ArgAction::Append)]
        add: Vec<String>,
        /// Withdraw actions on a repository pattern (repeatable).
        #[arg(long = "remove-repository", num_args = 2.., value_names = ["REPO", "ACTION"], action = clap::ArgAction::Append)]
        remove: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete a scope map no token uses.
    Delete {
        #[command(flatten)]
        file: TokensArg,
        #[arg(long)]
        name: String,
    },
    /// List scope maps and their rules.
    List {
        #[command(flatten)]
        file: TokensArg,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
#[command(after_help = "Examples:\n  \
    outpost-registry token create --tokens tokens.toml --name ci-pull --scope-map team-a-pull\n  \
    outpost-registry token update --tokens tokens.toml --name ci-pull --generate-password 2\n  \
    outpost-registry token update --tokens tokens.toml --name ci-pull --status disabled\n  \
    outpost-registry token list --tokens tokens.toml")]
pub enum TokenCommand {
    /// Create a token bound to a scope map; prints its generated password once.
    Create {
        #[command(flatten)]
        file: TokensArg,
        /// Token name: the username clients log in with.
        #[arg(long)]
        name: String,
        #[arg(long)]
        scope_map: String,
        #[arg(long, value_enum, default_value = "enabled")]
        status: Status,
        /// Create without a password (generate one later with `update --generate-password`).
        #[arg(long)]
        no_passwords: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// Change a token's scope map or status, or generate a new password 1 or 2.
    Update {
        #[command(flatten)]
        file: TokensArg,
        #[arg(long)]
        name: String,
        #[arg(long)]
        scope_map: Option<String>,
        #[arg(long, value_enum)]
        status: Option<Status>,
        /// Replace password 1 or 2 with a new generated one, printed once.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        generate_password: Option<u8>,
        /// Remove password 1 or 2.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        delete_password: Option<u8>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// Delete a token.
    Delete {
        #[command(flatten)]
        file: TokensArg,
        #[arg(long)]
        name: String,
    },
    /// List tokens (names, scope maps, status, which passwords are set; never the hashes).
    /// With --admin, then the namespaces whose namespace credentials that registry accepted
    /// since it started (a second table, or a second JSON array on its own line).
    List {
        #[command(flatten)]
        file: TokensArg,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
        /// Base URL of a running registry's admin API, to list namespace credentials too.
        #[arg(long)]
        admin: Option<String>,
        /// PEM CA bundle to trust when the admin API is served over HTTPS.
        #[arg(long, requires = "admin")]
        admin_ca_file: Option<PathBuf>,
    },
}

/// Splits the values of repeated `--repository REPO ACTION...` back into groups: every value
/// that is not an action starts a new group (clap hands them over flattened).
fn groups(values: &[String]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for v in values {
        match out.last_mut() {
            Some(g) if Action::parse(v).is_some() => g.push(v.clone()),
            _ => out.push(vec![v.clone()]),
        }
    }
    out
}

/// Removes the entry called `name`, or says there is none.
fn remove_named<T>(
    list: &mut Vec<T>,
    name: &str,
    name_of: impl Fn(&T) -> &str,
    what: &str,
) -> Result<(), TokensError> {
    let before = list.len();
    list.retain(|x| name_of(x) != name);
    if list.len() == before {
        return Err(invalid(format!("no {what} {name:?}")));
    }
    Ok(())
}

fn invalid(msg: impl Into<String>) -> TokensError {
    TokensError::Invalid(msg.into())
}

/// Runs `f` on the file under a lock, validates the result and saves it.
fn edit<T>(
    path: &Path,
    f: impl FnOnce(&mut TokensFile) -> Result<T, TokensError>,
) -> Result<T, TokensError> {
    let lock_path = path.with_file_name(format!(
        ".{}.lock",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .and_then(|l| l.lock().map(|_| l))
        .map_err(|source| TokensError::Write {
            path: lock_path.display().to_string(),
            source,
        })?;
    let mut file = TokensFile::load(path)?;
    let out = f(&mut file)?;
    file.validate()?;
    file.save(path)?;
    drop(lock);
    Ok(out)
}

fn print_password(output: Output, name: &str, slot: u8, password: &str) {
    match output {
        Output::Json => println!(
            "{}",
            json!({ "name": name, format!("password{slot}"): password })
        ),
        Output::Text => {
            eprintln!("Save this password now: only its hash is stored, it cannot be shown again.");
            println!("username: {name}");
            println!("password{slot}: {password}");
        }
    }
}

pub fn run_scope_map(cmd: ScopeMapCommand) -> Result<(), TokensError> {
    match cmd {
        ScopeMapCommand::Create {
            file,
            name,
            repository,
            gateway,
            description,
        } => {
            if !valid_name(&name) {
                return Err(invalid(format!(
                    "scope map name {name:?} must be 1-50 of A-Z a-z 0-9 - _"
                )));
            }
            let mut rule_groups = groups(&repository);
            for g in &gateway {
                rule_groups.push(vec![
                    crate::auth::gateway_repository(g),
                    Action::MessageWrite.as_str().to_owned(),
                ]);
            }
            let rules = rules_from_args(&rule_groups)?;
            edit(&file.tokens, |f| {
                if f.scope_map_mut(&name).is_some() {
                    return Err(invalid(format!("scope map {name:?} already exists")));
                }
                f.scope_maps.push(ScopeMapEntry {
                    name: name.clone(),
                    description,
                    rules,
                });
                Ok(())
            })?;
            eprintln!("scope map {name:?} created");
        }
        ScopeMapCommand::Update {
            file,
            name,
            add,
            remove,
            description,
        } => {
            let add = rules_from_args(&groups(&add))?;
            let remove = rules_from_args(&groups(&remove))?;
            edit(&file.tokens, |f| {
                let m = f
                    .scope_map_mut(&name)
                    .ok_or_else(|| invalid(format!("no scope map {name:?}")))?;
                for r in add {
                    match m.rules.iter_mut().find(|x| x.repository == r.repository) {
                        Some(x) => {
                            for a in r.actions {
                                if !x.actions.contains(&a) {
                                    x.actions.push(a);
                                }
                            }
                        }
                        None => m.rules.push(r),
                    }
                }
                for r in remove {
                    if let Some(x) = m.rules.iter_mut().find(|x| x.repository == r.repository) {
                        x.actions.retain(|a| !r.actions.contains(a));
                    }
                }
                m.rules.retain(|x| !x.actions.is_empty());
                if description.is_some() {
                    m.description = description;
                }
                Ok(())
            })?;
            eprintln!("scope map {name:?} updated");
        }
        ScopeMapCommand::Delete { file, name } => {
            edit(&file.tokens, |f| {
                let users = f.tokens_using(&name);
                if !users.is_empty() {
                    return Err(invalid(format!(
                        "scope map {name:?} is used by token(s) {}; delete or update them first",
                        users.join(", ")
                    )));
                }
                remove_named(&mut f.scope_maps, &name, |m| &m.name, "scope map")
            })?;
            eprintln!("scope map {name:?} deleted");
        }
        ScopeMapCommand::List { file, output } => {
            let f = TokensFile::load(&file.tokens)?;
            match output {
                Output::Json => {
                    let maps: Vec<_> = f
                        .scope_maps
                        .iter()
                        .map(|m| json!({"name": m.name, "description": m.description, "rules": m.rules.iter().map(|r| json!({"repository": r.repository, "actions": r.actions})).collect::<Vec<_>>()}))
                        .collect();
                    println!("{}", serde_json::Value::Array(maps));
                }
                Output::Text => {
                    println!("{:<30} {:<40} ACTIONS", "NAME", "REPOSITORY");
                    for m in &f.scope_maps {
                        for r in &m.rules {
                            println!(
                                "{:<30} {:<40} {}",
                                m.name,
                                r.repository,
                                r.actions.join(" ")
                            );
                        }
                        if m.rules.is_empty() {
                            println!("{:<30} {:<40} -", m.name, "-");
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

pub fn run_token(cmd: TokenCommand) -> Result<(), TokensError> {
    match cmd {
        TokenCommand::Create {
            file,
            name,
            scope_map,
            status,
            no_passwords,
            output,
        } => {
            if !valid_name(&name) {
                return Err(invalid(format!(
                    "token name {name:?} must be 1-50 of A-Z a-z 0-9 - _"
                )));
            }
            let password = if no_passwords {
                None
            } else {
                Some(generate_password()?)
            };
            let hash = password.as_deref().map(hash_password).transpose()?;
            edit(&file.tokens, |f| {
                if f.token_mut(&name).is_some() {
                    return Err(invalid(format!("token {name:?} already exists")));
                }
                if f.scope_map_mut(&scope_map).is_none() {
                    return Err(invalid(format!("no scope map {scope_map:?}")));
                }
                f.tokens.push(TokenEntry {
                    name: name.clone(),
                    scope_map,
                    password1: hash,
                    password2: None,
                    enabled: status == Status::Enabled,
                });
                Ok(())
            })?;
            match password {
                Some(p) => print_password(output, &name, 1, &p),
                None => eprintln!("token {name:?} created without passwords"),
            }
        }
        TokenCommand::Update {
            file,
            name,
            scope_map,
            status,
            generate_password: slot,
            delete_password,
            output,
        } => {
            let password = slot.map(|_| generate_password()).transpose()?;
            let hash = password.as_deref().map(hash_password).transpose()?;
            edit(&file.tokens, |f| {
                if let Some(m) = &scope_map
                    && f.scope_map_mut(m).is_none()
                {
                    return Err(invalid(format!("no scope map {m:?}")));
                }
                let t = f
                    .token_mut(&name)
                    .ok_or_else(|| invalid(format!("no token {name:?}")))?;
                if let Some(m) = scope_map {
                    t.scope_map = m;
                }
                if let Some(s) = status {
                    t.enabled = s == Status::Enabled;
                }
                match delete_password {
                    Some(1) => t.password1 = None,
                    Some(2) => t.password2 = None,
                    _ => {}
                }
                match slot {
                    Some(1) => t.password1 = hash,
                    Some(2) => t.password2 = hash,
                    _ => {}
                }
                Ok(())
            })?;
            match (slot, password) {
                (Some(s), Some(p)) => print_password(output, &name, s, &p),
                _ => eprintln!("token {name:?} updated"),
            }
        }
        TokenCommand::Delete { file, name } => {
            edit(&file.tokens, |f| {
                remove_named(&mut f.tokens, &name, |t| &t.name, "token")
            })?;
            eprintln!("token {name:?} deleted");
        }
        TokenCommand::List { file, output, .. } => {
            let f = TokensFile::load(&file.tokens)?;
            match output {
                Output::Json => {
                    let list: Vec<_> = f
                        .tokens
                        .iter()
                        .map(|t| json!({"name": t.name, "scopeMap": t.scope_map, "status": if t.enabled {"enabled"} else {"disabled"}, "password1": t.password1.is_some(), "password2": t.password2.is_some()}))
                        .collect();
                    println!("{}", serde_json::Value::Array(list));
                }
                Output::Text => {
                    println!(
                        "{:<30} {:<30} {:<9} PASSWORDS",
                        "NAME", "SCOPE MAP", "STATUS"
                    );
                    for t in &f.tokens {
                        let pw: Vec<&str> =
                            [(t.password1.is_some(), "1"), (t.password2.is_some(), "2")]
                                .into_iter()
                                .filter(|(set, _)| *set)
                                .map(|(_, n)| n)
                                .collect();
                        println!(
                            "{:<30} {:<30} {:<9} {}",
                            t.name,
                            t.scope_map,
                            if t.enabled { "enabled" } else { "disabled" },
                            if pw.is_empty() {
                                "-".to_owned()
                            } else {
                                pw.join(",")
                            }
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
