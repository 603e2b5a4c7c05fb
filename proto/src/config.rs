//! Configuration files: every service's `serve` takes `--config FILE` (TOML) whose keys are its
//! long flag names (`listen = "…"`, `max-per-ip = 64`; `_` works for `-` too).
//!
//! Precedence is command line, then environment, then the file, then the built-in default:
//! clap stays the one place that parses and validates values, so a key in the file is checked
//! exactly as the flag would be and `--help` documents both. A file value is handed to clap as
//! if it were a flag, but only for options the command line and the environment left unset.
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The id every service gives its `--config` option.
pub const CONFIG_ARG: &str = "config";

/// Parses the process's arguments, environment and `--config` file; exits with a message
/// naming the file, key and problem on error (status 2, as for any usage error).
pub fn parse<C: clap::Parser>() -> C {
    try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse`] on given arguments.
pub fn try_parse_from<C: clap::Parser>(
    args: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<C, clap::Error> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = C::command();
    let matches = cmd.try_get_matches_from_mut(&args)?;
    let (sub, sub_matches) = deepest(&cmd, &matches);
    let Some(file) = sub
        .get_arguments()
        .any(|a| a.get_id() == CONFIG_ARG)
        .then(|| sub_matches.get_one::<PathBuf>(CONFIG_ARG))
        .flatten()
    else {
        return C::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd));
    };
    let file = file.clone();
    let extra = file_args(&file, sub, sub_matches)
        .map_err(|m| config_error(&mut C::command(), &file, &m))?;
    let mut all = args;
    all.extend(extra.iter().map(|(_, a)| a.clone()));
    let mut cmd = C::command();
    match cmd.try_get_matches_from_mut(&all) {
        Ok(m) => C::from_arg_matches(&m).map_err(|e| e.format(&mut cmd)),
        Err(e) => {
            // Name the file and key when the bad value came from the file.
            let flag = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(s)) => s.split_whitespace().next().map(str::to_owned),
                _ => None,
            };
            match flag.and_then(|f| extra.iter().find(|(k, _)| format!("--{k}") == f)) {
                Some((key, _)) => {
                    let why = e.to_string();
                    let why = why.lines().next().unwrap_or_default();
                    let why = why.trim_start_matches("error: ");
                    Err(config_error(
                        &mut cmd,
                        &file,
                        &format!("key `{key}`: {why}"),
                    ))
                }
                None => Err(e),
            }
        }
    }
}

/// Logs, once logging is up, which file the settings came from.
pub fn log_config_file(file: Option<&Path>) {
    if let Some(f) = file {
        tracing::info!(file = %f.display(), "settings read from config file (the command line and environment override it)");
    }
}

fn config_error(cmd: &mut Command, file: &Path, message: &str) -> clap::Error {
    cmd.error(
        ErrorKind::InvalidValue,
        format!("config file {}: {message}", file.display()),
    )
}

/// The subcommand that will run and its matches.
fn deepest<'a>(cmd: &'a Command, m: &'a ArgMatches) -> (&'a Command, &'a ArgMatches) {
    let (mut c, mut m) = (cmd, m);
    while let Some((name, sm)) = m.subcommand() {
        match c.find_subcommand(name) {
            Some(sc) => (c, m) = (sc, sm),
            None => break,
        }
    }
    (c, m)
}

/// The file's settings as `--key=value` arguments, paired with their key, skipping those the
/// command line or environment already set.
fn file_args(
    file: &Path,
    cmd: &Command,
    matches: &ArgMatches,
) -> Result<Vec<(String, OsString)>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read it: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        format!("not valid TOML: {}", e.message()) + &line_of(&text, e.span())
    })?;
    let mut out = Vec::new();
    for (raw_key, value) in table {
        let key = raw_key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && a.get_id() != CONFIG_ARG)
            .ok_or_else(|| {
                let known: Vec<_> = cmd
                    .get_arguments()
                    .filter_map(|a| a.get_long())
                    .filter(|l| !matches!(*l, "config" | "help" | "version"))
                    .collect();
                format!("unknown key `{raw_key}` (known keys: {})", known.join(", "))
            })?;
        if matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let is_flag = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        let values = match value {
            toml::Value::Array(items) => items,
            v => vec![v],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if is_flag => {
                    if b {
                        out.push((key.clone(), format!("--{key}").into()));
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(format!(
                        "key `{raw_key}`: expected a string, number, boolean or list of them, found a {}",
                        other.type_str()
                    ));
                }
            };
            if is_flag {
                return Err(format!("key `{raw_key}`: expected true or false"));
            }
            out.push((key.clone(), format!("--{key}={text}").into()));
        }
    }
    Ok(out)
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|s| format!(" (line {})", text[..s.start].lines().count().max(1)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};
    use std::io::Write;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }
    #[derive(Debug, Subcommand)]
    enum Cmd {
        Serve {
            #[arg(long)]
            config: Option<PathBuf>,
            #[arg(long, env = "CONFIG_TEST_LISTEN", default_value = "0.0.0.0:1")]
            listen: std::net::SocketAddr,
            #[arg(long, default_value_t = 4)]
            max_per_ip: usize,
            #[arg(long)]
            require_origin: bool,
            #[arg(long = "allowed-origin")]
            allowed_origins: Vec<String>,
        },
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    fn parse(args: &[&str]) -> Result<Cli, String> {
        try_parse_from::<Cli>(args.iter().copied()).map_err(|e| e.to_string())
    }

    #[test]
    fn file_fills_what_the_command_line_leaves() {
        let f = file(
            "listen = \"127.0.0.1:9\"\nmax_per_ip = 7\nrequire-origin = true\nallowed-origin = [\"https://a\", \"https://b\"]\n",
        );
        let path = f.path().to_str().expect("utf8");
        let Cmd::Serve {
            listen,
            max_per_ip,
            require_origin,
            allowed_origins,
            ..
        } = parse(&["x", "serve", "--config", path]).expect("parse").cmd;
        assert_eq!(listen.to_string(), "127.0.0.1:9");
        assert_eq!(max_per_ip, 7);
        assert!(require_origin);
        assert_eq!(allowed_origins, ["https://a", "https://b"]);

        let Cmd::Serve { max_per_ip, .. } =
            parse(&["x", "serve", "--config", path, "--max-per-ip", "3"])
                .expect("parse")
                .cmd;
        assert_eq!(max_per_ip, 3, "the command line wins over the file");
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let bad_value = file("max-per-ip = \"many\"\n");
        let e = parse(&[
            "x",
            "serve",
            "--config",
            bad_value.path().to_str().expect("p"),
        ])
        .expect_err("bad value");
        assert!(e.contains("key `max-per-ip`") && e.contains("many"), "{e}");
        assert!(e.contains(&bad_value.path().display().to_string()), "{e}");

        let unknown = file("listen_adress = \"x\"\n");
        let e = parse(&[
            "x",
            "serve",
            "--config",
            unknown.path().to_str().expect("p"),
        ])
        .expect_err("unknown key");
        assert!(
            e.contains("unknown key `listen_adress`") && e.contains("listen"),
            "{e}"
        );

        let syntax = file("listen = \n");
        let e = parse(&["x", "serve", "--config", syntax.path().to_str().expect("p")])
            .expect_err("syntax");
        assert!(e.contains("not valid TOML") && e.contains("line 1"), "{e}");

        let table = file("[listen]\nx = 1\n");
        let e = parse(&["x", "serve", "--config", table.path().to_str().expect("p")])
            .expect_err("table");
        assert!(e.contains("key `listen`") && e.contains("table"), "{e}");

        let e = parse(&["x", "serve", "--config", "/nonexistent/x.toml"]).expect_err("missing");
        assert!(e.contains("cannot read it"), "{e}");
    }
}
