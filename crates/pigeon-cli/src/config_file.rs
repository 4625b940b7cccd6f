//! `pigeon serve --config FILE`: settings from a TOML file.
//!
//! Keys are the long flag names (`listen`, `data-dir`, `database`, `bus`,
//! `heartbeat-timeout`, …; `_` works as well as `-`). The command line wins over the
//! environment, which wins over the file, which wins over the defaults. The file's
//! settings become flags placed before the user's own, unless the user gave that flag or
//! its environment variable.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, bail};
use clap::CommandFactory;

/// The flag naming the file, and its environment variable.
const FLAG: &str = "config";
const ENV: &str = "PIGEON_CONFIG_FILE";

/// Returns the arguments with the config file's settings added, for `pigeon serve`.
pub(crate) fn expand<C: CommandFactory>(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    // `pigeon` has no global flags, so a subcommand is always the first argument.
    let serve_at = 1;
    if args.get(serve_at).is_none_or(|arg| arg != "serve") {
        return Ok(args);
    }
    let given: Vec<String> = args[serve_at + 1..]
        .iter()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    let path = flag_value(&given, FLAG).or_else(|| std::env::var(ENV).ok());
    let Some(path) = path.filter(|path| !path.is_empty()) else {
        return Ok(args);
    };
    let settings = read(Path::new(&path))?;
    let command = C::command();
    let serve = command
        .find_subcommand("serve")
        .context("the serve command")?;
    let mut added = Vec::new();
    for (key, value) in settings {
        let name = key.replace('_', "-");
        let Some(arg) = serve
            .get_arguments()
            .find(|arg| arg.get_long() == Some(name.as_str()) && name != FLAG)
        else {
            bail!("{path}: unknown setting `{key}` (see `pigeon serve --help`)");
        };
        // An empty variable counts as unset, as the flags treat it.
        let from_env = arg
            .get_env()
            .is_some_and(|env| std::env::var_os(env).is_some_and(|value| !value.is_empty()));
        if from_env || flag_value(&given, &name).is_some() {
            continue;
        }
        let value = match value {
            toml::Value::String(text) => text,
            toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                value.to_string()
            }
            other => bail!("{path}: `{key}` must be a string, number or boolean, not {other}"),
        };
        added.push(OsString::from(format!("--{name}")));
        added.push(OsString::from(value));
    }
    let mut expanded = args;
    expanded.splice(serve_at + 1..serve_at + 1, added);
    Ok(expanded)
}

fn read(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    text.parse::<toml::Table>()
        .with_context(|| format!("parsing the config file {}", path.display()))
}

/// The value of `--name VALUE` or `--name=VALUE` among `args`.
fn flag_value(args: &[String], name: &str) -> Option<String> {
    let long = format!("--{name}");
    args.iter().enumerate().find_map(|(at, arg)| {
        if *arg == long {
            args.get(at + 1).cloned()
        } else {
            arg.strip_prefix(&long)?
                .strip_prefix('=')
                .map(str::to_owned)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::flag_value;

    #[test]
    fn flags_are_found_in_both_spellings() {
        let args: Vec<String> = ["--listen", "1.2.3.4:5", "--bus=nats://x"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(flag_value(&args, "listen").as_deref(), Some("1.2.3.4:5"));
        assert_eq!(flag_value(&args, "bus").as_deref(), Some("nats://x"));
        assert_eq!(flag_value(&args, "database"), None);
        assert_eq!(flag_value(&args, "bu"), None, "no prefix match");
    }
}
