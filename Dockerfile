# pgbudget: multi-stage build, small runtime image. SIGTERM drains (finish transactions, Terminate servers, exit 0).
FROM rust:1-bookworm AS build
WORKDIR /src
# The lake links the official prebuilt DuckDB 1.5.5 and loads the DuckLake extensions: scripts/lake-deps fetches
# them by name (npm, PyPI), checks deps/duckdb-1.5.5.sha256 and installs them where the runtime image keeps them.
RUN apt-get update && apt-get install -y --no-install-recommends npm python3-pip && rm -rf /var/lib/apt/lists/*
ENV PGBUDGET_DUCKDB_HOME=/opt/pgbudget/duckdb
COPY scripts/lake-deps ./scripts/lake-deps
COPY deps ./deps
RUN bash scripts/lake-deps
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin pgbudget && strip target/release/pgbudget

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 pgbudget && mkdir -p /var/lib/pgbudget && chown pgbudget /var/lib/pgbudget
# Same path as at build time: the binary's rpath and default extension directory point here.
COPY --from=build /opt/pgbudget/duckdb/lib /opt/pgbudget/duckdb/lib
COPY --from=build /opt/pgbudget/duckdb/extensions /opt/pgbudget/duckdb/extensions
COPY --from=build /src/target/release/pgbudget /usr/local/bin/pgbudget
COPY budgets.toml /etc/pgbudget/budgets.toml
USER pgbudget
# The embedded lake (lake.dir = "pgbudget-lake") lives under the working directory; mount a volume to keep it.
WORKDIR /var/lib/pgbudget
ENV PGBUDGET_CONFIG=/etc/pgbudget/budgets.toml PGBUDGET_LISTEN=0.0.0.0:6432
EXPOSE 6432
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pgbudget"]
CMD ["run"]
