//! The operators' documentation against the code: every setting a service reads is
//! documented in docs/configuration.md, with the default the code uses, and every
//! metric it exports is named in docs/operations.md.

use std::path::Path;

use clap::CommandFactory;

fn doc(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("docs/{name}: {e}"))
}

/// The rows `| `NAME` | default | ...` of docs/configuration.md, by variable name.
fn documented() -> Vec<(String, String)> {
    let text = doc("configuration.md");
    text.lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let default = cells.next()?;
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                .then(|| (name.to_owned(), default.to_owned()))
        })
        .collect()
}

fn check<C: CommandFactory>(service: &str) {
    let rows = documented();
    let mut problems = Vec::new();
    let mut names: Vec<(String, Option<String>)> = C::command()
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_string_lossy().into_owned();
            let default = a
                .get_default_values()
                .first()
                .map(|d| d.to_string_lossy().into_owned());
            Some((env, default))
        })
        .collect();
    names.push((mosaic_runtime::config::LOG_FILTER_VAR.to_owned(), None));
    for (name, default) in names {
        match rows.iter().find(|(n, _)| *n == name) {
            None => problems.push(format!("{service} reads {name}, which is not documented")),
            Some((_, cell)) => {
                if let Some(d) = default
                    && !cell.contains(&format!("`{d}`"))
                {
                    problems.push(format!(
                        "{service}: {name} defaults to `{d}` in the code, the docs say {cell:?}"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md is out of date:\n{}",
        problems.join("\n")
    );
}

#[test]
fn websocket_service_settings_are_documented() {
    check::<websocket_service::Config>("websocket-service");
}

#[test]
fn device_service_settings_are_documented() {
    check::<device_service::Config>("device-service");
}

#[test]
fn every_metric_is_in_the_operations_guide() {
    let text = doc("operations.md");
    let missing: Vec<&str> = websocket_service::metrics::ALL
        .iter()
        .chain(device_service::metrics::ALL.iter())
        .chain(mosaic_amqp::metrics::ALL.iter())
        .copied()
        .filter(|m| !text.contains(&format!("`{m}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not name {missing:?}"
    );
}
