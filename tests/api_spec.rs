//! Keeps the OpenAPI description in docs/api.yaml honest: it must describe exactly the
//! (method, path) pairs the router serves (`ROUTES` in src/api/router.rs), and none of the
//! Firecracker resources ember refuses (`UNSUPPORTED`).
//!
//! The YAML is read without a YAML library, by indentation: under the top-level `paths:`
//! key, path keys (`/drives/{drive_id}:`) share one indentation, and each path's HTTP
//! methods (`get:`, `put:`, `patch:`) are the keys one level below it.

use std::collections::BTreeSet;

use ember::api::router::{ROUTES, UNSUPPORTED};

const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.yaml");

/// The operation keys OpenAPI allows in a path item.
const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

#[derive(Debug)]
struct Operation {
    method: String,
    path: String,
    /// 1-based line of the method key.
    line: usize,
    /// The lines nested under the method key.
    body: Vec<String>,
}

#[derive(Debug)]
struct Paths {
    /// Every path key with its 1-based line.
    paths: Vec<(String, usize)>,
    operations: Vec<Operation>,
}

/// The key of a block-mapping line (`key:` or `key: value`, the key possibly quoted), or
/// `None` for anything else (a list item, a continuation of a multi-line scalar).
fn mapping_key(content: &str) -> Option<String> {
    if content.starts_with('-') {
        return None;
    }
    let (key, rest) = match content.chars().next()? {
        quote @ ('"' | '\'') => {
            let end = content[1..].find(quote)? + 1;
            (&content[1..end], &content[end + 1..])
        }
        _ => {
            let colon = content
                .char_indices()
                .find(|&(i, c)| {
                    c == ':' && content[i + 1..].chars().next().is_none_or(|n| n == ' ')
                })?
                .0;
            (&content[..colon], &content[colon..])
        }
    };
    let after = rest.strip_prefix(':')?;
    (after.is_empty() || after.starts_with(' ')).then(|| key.trim().to_owned())
}

/// Reads the `paths:` section of an OpenAPI document.
fn parse_paths(text: &str) -> Result<Paths, String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| {
            let l = l.trim_end();
            l == "paths:" || l.starts_with("paths: #")
        })
        .ok_or("no top-level `paths:` line (a block mapping at column 0) was found")?;

    let mut paths: Vec<(String, usize)> = Vec::new();
    let mut operations: Vec<Operation> = Vec::new();
    let mut path_indent: Option<usize> = None;
    // The path being read, and the indentation of its keys once known.
    let mut current: Option<(String, Option<usize>)> = None;
    let mut in_operation = false;

    for (i, raw) in lines.iter().enumerate().skip(start + 1) {
        let n = i + 1;
        let content = raw.trim_start_matches(' ');
        if content.trim().is_empty() || content.starts_with('#') {
            continue;
        }
        if content.starts_with('\t') {
            return Err(format!("line {n}: tab in the indentation"));
        }
        let indent = raw.len() - content.len();
        if indent == 0 {
            break; // the next top-level key ends the section
        }
        let pi = *path_indent.get_or_insert(indent);
        if indent < pi {
            return Err(format!(
                "line {n}: indented less than the path keys ({indent} < {pi} spaces): {raw:?}"
            ));
        }
        if indent == pi {
            in_operation = false;
            let key =
                mapping_key(content).ok_or_else(|| format!("line {n}: not a path key: {raw:?}"))?;
            if key.starts_with('/') {
                if paths.iter().any(|(p, _)| *p == key) {
                    return Err(format!("line {n}: path {key} appears twice"));
                }
                paths.push((key.clone(), n));
                current = Some((key, None));
            } else if key.starts_with("x-") {
                current = None; // a specification extension, not a path
            } else {
                return Err(format!(
                    "line {n}: key {key:?} under `paths:` is neither a path (starting with '/') nor an x- extension"
                ));
            }
            continue;
        }
        let Some((path, method_indent)) = current.as_mut() else {
            continue;
        };
        let mi = *method_indent.get_or_insert(indent);
        if indent < mi {
            return Err(format!(
                "line {n}: indented between a path key and its methods: {raw:?}"
            ));
        }
        if indent == mi {
            in_operation = false;
            let Some(key) = mapping_key(content) else {
                continue;
            };
            if HTTP_METHODS.contains(&key.as_str()) {
                if operations
                    .iter()
                    .any(|o| o.path == *path && o.method == key)
                {
                    return Err(format!("line {n}: {key} {path} appears twice"));
                }
                operations.push(Operation {
                    method: key,
                    path: path.clone(),
                    line: n,
                    body: Vec::new(),
                });
                in_operation = true;
            } else if HTTP_METHODS.contains(&key.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "line {n}: method key {key:?} under {path} must be lowercase"
                ));
            }
        } else if in_operation && let Some(op) = operations.last_mut() {
            op.body.push(raw.to_string());
        }
    }

    if paths.is_empty() {
        return Err(format!(
            "the `paths:` section (line {}) has no path keys",
            start + 1
        ));
    }
    for (path, line) in &paths {
        if !operations.iter().any(|o| o.path == *path) {
            return Err(format!("line {line}: path {path} has no operations"));
        }
    }
    Ok(Paths { paths, operations })
}

fn spec() -> Paths {
    let text = std::fs::read_to_string(SPEC).unwrap_or_else(|e| panic!("cannot read {SPEC}: {e}"));
    parse_paths(&text).unwrap_or_else(|e| panic!("{SPEC}: {e}"))
}

fn described(spec: &Paths) -> BTreeSet<(String, String)> {
    spec.operations
        .iter()
        .map(|o| (o.method.to_ascii_uppercase(), o.path.clone()))
        .collect()
}

fn served() -> BTreeSet<(String, String)> {
    ROUTES
        .iter()
        .map(|&(m, p)| (m.to_owned(), p.to_owned()))
        .collect()
}

fn list(items: &[(String, String)]) -> String {
    items
        .iter()
        .map(|(m, p)| format!("  {m} {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_served_route_is_described() {
    let described = described(&spec());
    let missing: Vec<_> = served()
        .iter()
        .filter(|r| !described.contains(*r))
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "docs/api.yaml does not describe these routes from ROUTES in src/api/router.rs:\n{}",
        list(&missing)
    );
}

#[test]
fn every_described_operation_is_served() {
    let served = served();
    let spec = spec();
    let extra: Vec<_> = described(&spec)
        .into_iter()
        .filter(|r| !served.contains(r))
        .collect();
    assert!(
        extra.is_empty(),
        "docs/api.yaml describes operations that are not in ROUTES (src/api/router.rs):\n{}",
        list(&extra)
    );
}

#[test]
fn no_unsupported_resource_is_described() {
    let spec = spec();
    let bad: Vec<String> = spec
        .paths
        .iter()
        .filter(|(p, _)| {
            let first = p.trim_start_matches('/').split('/').next().unwrap_or("");
            UNSUPPORTED.contains(&first)
        })
        .map(|(p, line)| format!("  {p} (line {line})"))
        .collect();
    assert!(
        bad.is_empty(),
        "docs/api.yaml describes resources the router refuses as unsupported (UNSUPPORTED in src/api/router.rs):\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_operation_lists_responses() {
    let spec = spec();
    let bare: Vec<String> = spec
        .operations
        .iter()
        .filter(|o| !o.body.iter().any(|l| l.trim_end().ends_with("responses:")))
        .map(|o| format!("  {} {} (line {})", o.method, o.path, o.line))
        .collect();
    assert!(
        bare.is_empty(),
        "operations without `responses:` in docs/api.yaml:\n{}",
        bare.join("\n")
    );
}

#[test]
fn prometheus_endpoint_is_marked_as_an_ember_extension() {
    let spec = spec();
    let op = spec
        .operations
        .iter()
        .find(|o| o.method == "get" && o.path == "/metrics/prometheus")
        .expect("GET /metrics/prometheus is not in docs/api.yaml");
    assert!(
        op.body
            .iter()
            .any(|l| l.trim() == "x-ember-extension: true"),
        "GET /metrics/prometheus (docs/api.yaml line {}) lacks `x-ember-extension: true`",
        op.line
    );
}

// The checker itself: it must be able to fail.

#[test]
fn parser_fails_without_a_paths_section() {
    let err = parse_paths("openapi: 3.0.3\ninfo:\n  title: x\n  paths:\n    /a:\n      get: {}\n")
        .unwrap_err();
    assert!(err.contains("no top-level `paths:`"), "{err}");
    assert!(parse_paths("paths:\ncomponents:\n  x: 1\n").is_err());
    assert!(parse_paths("paths:\n  /a:\n    parameters: []\n").is_err());
}

#[test]
fn parser_reads_methods_one_level_below_paths() {
    let text = r##"openapi: 3.0.3
paths:
  # a comment
  /:
    get:
      description: |
        put:
          not a method: this is text
      responses: {}
  "/drives/{drive_id}":
    parameters:
    - $ref: "#/components/parameters/DriveId"
    summary: drives
    put:
      responses: {}

    patch:
      responses: {}
  x-note: ignored
components:
  schemas: {}
"##;
    let spec = parse_paths(text).unwrap();
    let got: Vec<(String, String, usize)> = spec
        .operations
        .iter()
        .map(|o| (o.method.clone(), o.path.clone(), o.line))
        .collect();
    assert_eq!(
        got,
        [
            ("get".into(), "/".into(), 5),
            ("put".into(), "/drives/{drive_id}".into(), 14),
            ("patch".into(), "/drives/{drive_id}".into(), 17),
        ]
    );
    assert_eq!(spec.paths.len(), 2);
}

#[test]
fn parser_rejects_suspicious_layouts() {
    for (text, want) in [
        (
            "paths:\n  /a:\n    get: {}\n  /a:\n    put: {}\n",
            "appears twice",
        ),
        ("paths:\n  /a:\n    get: {}\n    get: {}\n", "appears twice"),
        ("paths:\n  /a:\n    GET: {}\n", "lowercase"),
        ("paths:\n  a:\n    get: {}\n", "neither a path"),
        ("paths:\n    /a:\n      get: {}\n  /b:\n", "indented less"),
        (
            "paths:\n  /a:\n      get: {}\n    put: {}\n",
            "between a path key",
        ),
    ] {
        let err = parse_paths(text).unwrap_err();
        assert!(err.contains(want), "{text:?}: {err}");
    }
}

/// Firecracker's API description, beside the repository (`../shared/reference/`), if any.
fn firecracker_description() -> Option<(std::path::PathBuf, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference");
    let file = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("firecracker-api") && n.ends_with(".yaml"))
        })?;
    let text = std::fs::read_to_string(&file).ok()?;
    Some((file, text))
}

/// A path with its parameters' names erased: `/drives/{drive_id}` and `/drives/{id}` are
/// one path.
fn shape(path: &str) -> String {
    path.split('/')
        .map(|s| if s.starts_with('{') { "{}" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

/// The operations docs/api.md lists under "Not supported".
fn documented_unsupported() -> BTreeSet<(String, String)> {
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md");
    let text = std::fs::read_to_string(doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
    let section = text
        .split("\n## Not supported\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{doc} has no `## Not supported` section"));
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter_map(|op| op.split_once(' '))
        .map(|(m, p)| (m.to_owned(), shape(p)))
        .collect()
}

/// Every operation of Firecracker's API description is served by ember or listed, with a
/// reason, as not supported in docs/api.md; nothing listed there is served.
#[test]
fn every_firecracker_operation_is_served_or_documented_as_not_supported() {
    let Some((file, text)) = firecracker_description() else {
        let reason = "Firecracker's API description is not in ../shared/reference/";
        if std::env::var_os("CI").is_some() {
            panic!("this test cannot run here: {reason}");
        }
        eprintln!("NOT RUN (this counts as a failure in CI): {reason}");
        return;
    };
    let firecracker = parse_paths(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let served: BTreeSet<(String, String)> =
        served().into_iter().map(|(m, p)| (m, shape(&p))).collect();
    let unsupported = documented_unsupported();
    let neither: Vec<(String, String)> = firecracker
        .operations
        .iter()
        .map(|o| (o.method.to_ascii_uppercase(), shape(&o.path)))
        .filter(|op| !served.contains(op) && !unsupported.contains(op))
        .collect();
    assert!(
        neither.is_empty(),
        "operations of {} neither served nor listed under \"Not supported\" in docs/api.md:\n{}",
        file.display(),
        list(&neither)
    );
    let both: Vec<(String, String)> = unsupported.intersection(&served).cloned().collect();
    assert!(
        both.is_empty(),
        "docs/api.md lists served operations as not supported:\n{}",
        list(&both)
    );
    // Each listed operation's resource is one the router refuses with "not supported".
    for (method, path) in &unsupported {
        let resource = path.split('/').nth(1).unwrap_or_default();
        assert!(
            UNSUPPORTED.contains(&resource),
            "{method} {path} is listed as not supported but /{resource} is not in UNSUPPORTED"
        );
    }
}
