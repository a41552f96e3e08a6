//! Build script: with the `lake` feature, find the prebuilt `libduckdb.so` (DuckDB 1.5.5) that
//! `scripts/lake-deps` installs, add it to the link search path and give every binary an rpath to it, so
//! tests and `pgbudget` run without `LD_LIBRARY_PATH`. Without the feature it does nothing.

use std::env;
use std::path::PathBuf;

const DUCKDB_VERSION: &str = "1.5.5";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    println!("cargo:rerun-if-env-changed=PGBUDGET_DUCKDB_HOME");
    if env::var_os("CARGO_FEATURE_LAKE").is_none() {
        return;
    }
    // DUCKDB_LIB_DIR wins (libduckdb-sys reads it too); else the lake-deps cache dir.
    let (lib_dir, home) = match env::var_os("DUCKDB_LIB_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            // The lake-deps layout (<home>/lib) also tells where the extensions are.
            let home = dir.parent().filter(|h| dir.ends_with("lib") && h.join("extensions").is_dir());
            (dir.clone(), home.map(PathBuf::from))
        }
        None => {
            let home = env::var_os("PGBUDGET_DUCKDB_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| {
                env::var_os("HOME")
                    .map(|h| PathBuf::from(h).join(".cache/pgbudget").join(format!("duckdb-{DUCKDB_VERSION}")))
            });
            match home {
                Some(h) => (h.join("lib"), Some(h)),
                None => fail("neither DUCKDB_LIB_DIR, PGBUDGET_DUCKDB_HOME nor HOME is set"),
            }
        }
    };
    let lib = lib_dir.join("libduckdb.so");
    println!("cargo:rerun-if-changed={}", lib.display());
    if !lib.is_file() {
        fail(&format!("{} not found", lib.display()));
    }
    let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    // The runtime default for the extension directory (overridable in config and by PGBUDGET_DUCKDB_HOME).
    if let Some(home) = home {
        println!("cargo:rustc-env=PGBUDGET_DUCKDB_HOME_BUILT={}", home.display());
    }
}

fn fail(why: &str) -> ! {
    panic!(
        "\n\npgbudget's `lake` feature (on by default) links the prebuilt DuckDB {DUCKDB_VERSION} library: {why}.\n\
         Run `scripts/lake-deps` (installs it into ~/.cache/pgbudget/duckdb-{DUCKDB_VERSION}, or $PGBUDGET_DUCKDB_HOME),\n\
         or point DUCKDB_LIB_DIR at a directory holding libduckdb.so {DUCKDB_VERSION},\n\
         or build without the lake: `cargo build --no-default-features`.\n"
    )
}
