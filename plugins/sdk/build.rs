//! Embeds the WIT contract into the SDK.
//!
//! `export_plugin!` expands inside the plugin's crate, where a relative
//! `path:` to `wit/` would resolve against the plugin's own manifest and
//! break for any plugin outside this repository. So the contract text is
//! written into a macro here, once, from the single source of truth
//! (`../../wit/execd-plugin.wit`), and the plugin's bindings are generated
//! from that text (`inline:`), wherever the plugin lives.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;

/// The worlds a plugin can target, keyed by the phases given to `export_plugin!`.
const WORLDS: [(&str, &str); 3] = [
    ("pre", "pre-plugin"),
    ("post", "post-plugin"),
    ("pre, post", "plugin"),
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let wit_path = manifest_dir.join("../../wit/execd-plugin.wit");
    println!("cargo::rerun-if-changed={}", wit_path.display());
    let wit = fs::read_to_string(&wit_path)
        .unwrap_or_else(|err| panic!("cannot read the WIT contract {}: {err}", wit_path.display()));

    let package = package_id(&wit);
    let sdk_bindings = sdk_bindings(&wit_path, &package);
    write_out("sdk_bindings.rs", &sdk_bindings);

    let mut out = String::new();
    out.push_str(
        "/// Generates the bindings of one world in the calling crate. Used by `export_plugin!`.\n\
         #[doc(hidden)]\n#[macro_export]\nmacro_rules! __execd_plugin_world {\n",
    );
    for (phases, world) in WORLDS {
        // `with` points the plugin's bindings at the SDK's own types and
        // log import, so a plugin and the SDK share one set of Rust types.
        // `runtime_path` spares the plugin a direct wit-bindgen dependency.
        writeln!(
            out,
            "    ({phases}) => {{\n        $crate::__private::wit_bindgen::generate!({{\n            \
             inline: {wit:?},\n            world: \"{world}\",\n            \
             runtime_path: \"::execd_plugin_sdk::__private::wit_bindgen::rt\",\n            \
             with: {{\n                \
             \"{ns}/types@{version}\": ::execd_plugin_sdk::types,\n                \
             \"{ns}/log@{version}\": ::execd_plugin_sdk::__private::log_import,\n            \
             }},\n        }});\n    }};",
            ns = package.name,
            version = package.version,
        )
        .expect("writing to a String cannot fail");
    }
    out.push_str("}\n");

    write_out("world_macro.rs", &out);
}

/// `execd:plugin` and `0.1.0`, from the contract's `package execd:plugin@0.1.0;` line.
struct PackageId {
    name: String,
    version: String,
}

fn package_id(wit: &str) -> PackageId {
    let decl = wit
        .lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix("package "))
        .expect("the WIT contract declares a package");
    let (name, version) = decl
        .trim_end_matches(';')
        .split_once('@')
        .expect("the WIT package is versioned (`package ns:name@x.y.z;`)");
    PackageId {
        name: name.trim().to_owned(),
        version: version.trim().to_owned(),
    }
}

/// The SDK's own bindings: the shared types and the log import, and no
/// exports. Its world lives in a package of its own (`execd:plugin-sdk`) that
/// imports from the contract. The component-type section this leaves in
/// every plugin names only imports every plugin world has anyway, so it
/// never adds an export a plugin lacks when the sections are merged.
fn sdk_bindings(wit_path: &std::path::Path, package: &PackageId) -> String {
    let dir = wit_path.parent().expect("a file has a parent folder");
    let dir = fs::canonicalize(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
    let inline = format!(
        "package execd:plugin-sdk;\n\
         world sdk {{\n    \
         import {ns}/types@{version};\n    \
         import {ns}/log@{version};\n\
         }}\n",
        ns = package.name,
        version = package.version,
    );
    format!(
        "wit_bindgen::generate!({{\n    \
         path: {dir:?},\n    \
         inline: {inline:?},\n    \
         world: \"execd:plugin-sdk/sdk\",\n    \
         additional_derives: [PartialEq, Eq],\n    generate_unused_types: true,\n    generate_all,\n\
         }});\n",
        dir = dir.to_str().expect("the WIT path is UTF-8"),
    )
}

fn write_out(name: &str, contents: &str) {
    let dest = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join(name);
    fs::write(&dest, contents)
        .unwrap_or_else(|err| panic!("cannot write {}: {err}", dest.display()));
}
