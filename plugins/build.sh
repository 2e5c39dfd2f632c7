#!/usr/bin/env bash
# Builds the execd plugins and copies each component to
# plugins/dist/<name>.wasm (e.g. dist/api-key.wasm). A plugin builds for
# wasm32-wasip2, or for the target its manifest names in
# `[package.metadata.execd] target = "..."` (wasm32-unknown-unknown for a
# plugin that needs nothing of WASI; .cargo/config.toml links it).
#
#   plugins/build.sh                    # every plugin in this workspace
#   plugins/build.sh api-key jwt        # just these
#   plugins/build.sh --check-template   # also build a filled-in copy of
#                                       # plugins/template (what `execd plugin new` makes)
#   plugins/build.sh --verify           # also check each component's exports
#                                       # with wasm-tools (skipped if absent)
#
# Environment:
#   PLUGINS_TARGET_DIR  cargo target dir (default ~/.cache/execd/plugins-target;
#                       the Makefile exports it). CARGO_TARGET_DIR is deliberately
#                       ignored: it points at the host's build, whose lock a
#                       plugin build must not share.
#   CARGO_BUILD_JOBS    parallel jobs (default 2: the machines have 2 cores).
#
# Idempotent: cargo rebuilds nothing when nothing changed, and a component is
# copied only when its bytes differ, so dist/ timestamps stay put.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
target_dir=${PLUGINS_TARGET_DIR:-$HOME/.cache/execd/plugins-target}
jobs=${CARGO_BUILD_JOBS:-2}
dist="$here/dist"
default_target=wasm32-wasip2

check_template=false
verify=false
requested=()
for arg in "$@"; do
    case "$arg" in
        --check-template) check_template=true ;;
        --verify) verify=true ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*) echo "build.sh: unknown option $arg (see --help)" >&2; exit 64 ;;
        *) requested+=("$arg") ;;
    esac
done

# A plugin is a workspace member directory whose crate is a cdylib; its
# package name is its directory name (checked below), and dist/ uses it.
all_plugins=()
for manifest in "$here"/*/Cargo.toml; do
    dir=$(dirname "$manifest")
    name=$(basename "$dir")
    [[ "$name" == template ]] && continue
    grep -q '^crate-type = \["cdylib"\]' "$manifest" || continue
    if ! grep -q "^name = \"$name\"\$" "$manifest"; then
        echo "build.sh: $manifest: the package must be named \"$name\" like its directory" >&2
        exit 1
    fi
    all_plugins+=("$name")
done

if ((${#requested[@]})); then
    for name in "${requested[@]}"; do
        if [[ ! " ${all_plugins[*]} " == *" $name "* ]]; then
            echo "build.sh: no plugin named $name (have: ${all_plugins[*]})" >&2
            exit 64
        fi
    done
    plugins=("${requested[@]}")
else
    plugins=("${all_plugins[@]}")
fi

# The target a plugin's manifest names, or the default.
target_of() {
    local target
    target=$(sed -n '/^\[package.metadata.execd\]/,/^\[/s/^target = "\(.*\)"$/\1/p' "$here/$1/Cargo.toml")
    echo "${target:-$default_target}"
}

# One cargo build per target. It runs from here, so that
# .cargo/config.toml (the linker and memory of builds without WASI) applies.
declare -A target_for
for name in "${plugins[@]}"; do target_for[$name]=$(target_of "$name"); done
for target in $(printf '%s\n' "${target_for[@]}" | sort -u); do
    packages=()
    for name in "${plugins[@]}"; do
        if [[ "${target_for[$name]}" == "$target" ]]; then packages+=(-p "$name"); fi
    done
    (cd "$here" && cargo build --release --target "$target" \
        --target-dir "$target_dir" -j "$jobs" "${packages[@]}")
done

# Copies $1 to $2 unless $2 already holds the same bytes.
copy_if_changed() {
    if ! cmp -s "$1" "$2"; then
        cp "$1" "$2.tmp"
        mv "$2.tmp" "$2"
        echo "updated ${2#"$here"/}"
    fi
}

mkdir -p "$dist"
for name in "${plugins[@]}"; do
    copy_if_changed "$target_dir/${target_for[$name]}/release/${name//-/_}.wasm" "$dist/$name.wasm"
done
if ((${#requested[@]} == 0)); then
    # A plugin that was removed or renamed leaves no stale component behind.
    for file in "$dist"/*.wasm; do
        [[ -e "$file" ]] || continue
        name=$(basename "$file" .wasm)
        if [[ ! " ${all_plugins[*]} " == *" $name "* ]]; then
            rm -f "$file"
            echo "removed stale dist/$name.wasm"
        fi
    done
fi

# The exports must name the WIT package this SDK was built from, and every
# plugin exports `config` plus at least one phase.
if $verify; then
    if ! command -v wasm-tools >/dev/null; then
        echo "build.sh: --verify skipped: wasm-tools is not installed" \
            "(cargo install wasm-tools --locked)" >&2
    else
        version=$(sed -n 's/^package execd:plugin@\(.*\);$/\1/p' "$here/../wit/execd-plugin.wit")
        for name in "${plugins[@]}"; do
            wit=$(wasm-tools component wit "$dist/$name.wasm")
            exports=$(grep -o "export execd:plugin/[a-z-]*@$version" <<<"$wit" | sed 's/.*\///; s/@.*//' | sort | tr '\n' ' ')
            case "$exports" in
                "config post " | "config pre " | "config post pre ") ;;
                *)
                    echo "build.sh: dist/$name.wasm exports [${exports}]; expected config and pre and/or post @$version" >&2
                    echo "$wit" >&2
                    exit 1
                    ;;
            esac
            echo "verified dist/$name.wasm: exports ${exports% }"
        done
    fi
fi

# Fill in the template the way `execd plugin new` does and build it, so the
# template cannot rot. It builds outside the repository, as a new plugin
# would, pinned to this workspace's lock file.
if $check_template; then
    check_dir="$target_dir/template-check"
    mkdir -p "$check_dir/src"
    sdk_spec="{ path = \"$here/sdk\" }"
    fill() { sed -e "s|{{name}}|execd-template-check|g" -e "s|{{sdk}}|$sdk_spec|g" "$1"; }
    fill "$here/template/Cargo.toml" >"$check_dir/Cargo.toml.new"
    fill "$here/template/src/lib.rs" >"$check_dir/src/lib.rs.new"
    # Only touch files whose contents changed, so cargo's fingerprints hold.
    for file in Cargo.toml src/lib.rs; do
        if cmp -s "$check_dir/$file.new" "$check_dir/$file"; then
            rm "$check_dir/$file.new"
        else
            mv "$check_dir/$file.new" "$check_dir/$file"
        fi
    done
    [[ -e "$check_dir/Cargo.lock" ]] || cp "$here/Cargo.lock" "$check_dir/Cargo.lock"
    if grep -rq '{{' "$check_dir/Cargo.toml" "$check_dir/src"; then
        echo "build.sh: the template has a placeholder other than {{name}} and {{sdk}}" >&2
        exit 1
    fi
    cargo build --manifest-path "$check_dir/Cargo.toml" --release --target "$default_target" \
        --target-dir "$target_dir" -j "$jobs"
    echo "template builds: $target_dir/$default_target/release/execd_template_check.wasm"
fi
