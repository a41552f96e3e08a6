# pgbudget: multi-stage build, small runtime image. SIGTERM drains (finish transactions, Terminate servers, exit 0).
#
#   docker build -t pgbudget .                          # with the DuckLake telemetry warehouse (default)
#   docker build --build-arg FEATURES= -t pgbudget .    # without it: no DuckDB library or extensions
#
# Run it with the whole configuration in the environment (DATABASE_URL + PGBUDGET_SLICES, see README
# "Configuration from the environment") or with a file: -e PGBUDGET_CONFIG=/etc/pgbudget/budgets.toml and a mount.
FROM rust:1-bookworm AS build
ARG FEATURES=lake
WORKDIR /src
# The lake links the official prebuilt DuckDB 1.5.5 and loads the DuckLake extensions: scripts/lake-deps fetches
# them by name (npm, PyPI), checks deps/duckdb-1.5.5.sha256 and installs them where the runtime image keeps them.
ENV PGBUDGET_DUCKDB_HOME=/opt/pgbudget/duckdb
COPY scripts/lake-deps ./scripts/lake-deps
COPY deps ./deps
RUN if [ -n "$FEATURES" ]; then \
      apt-get update && apt-get install -y --no-install-recommends npm python3-pip && rm -rf /var/lib/apt/lists/* \
      && bash scripts/lake-deps; \
    fi; mkdir -p /opt/pgbudget/duckdb/lib /opt/pgbudget/duckdb/extensions
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin pgbudget --no-default-features --features "$FEATURES" \
    && strip target/release/pgbudget

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 pgbudget && mkdir -p /var/lib/pgbudget && chown pgbudget /var/lib/pgbudget
# Same path as at build time: the binary's rpath and default extension directory point here (empty without lake).
COPY --from=build /opt/pgbudget/duckdb/lib /opt/pgbudget/duckdb/lib
COPY --from=build /opt/pgbudget/duckdb/extensions /opt/pgbudget/duckdb/extensions
COPY --from=build /src/target/release/pgbudget /usr/local/bin/pgbudget
# For application images that run pgbudget as a sidecar (examples/sidecar/Dockerfile copies both from here).
COPY examples/sidecar/entrypoint /usr/local/bin/pgbudget-sidecar
COPY budgets.toml /etc/pgbudget/budgets.toml
COPY examples/shared/budgets.toml /etc/pgbudget/shared.toml
USER pgbudget
# The embedded lake (lake.dir = "pgbudget-lake") lives under the working directory; mount a volume to keep it.
WORKDIR /var/lib/pgbudget
# Container defaults: clients on [::]:6432 (IPv4 and IPv6: Railway's private network is IPv6), the admin listener
# (/health /ready /metrics ...) on [::]:$PORT, or [::]:9187 without PORT, so the platform's health check and
# Prometheus reach it. PGBUDGET_LISTEN / PGBUDGET_ADMIN_LISTEN override both.
ENV PGBUDGET_CONTAINER=1
EXPOSE 6432 9187
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s CMD ["/usr/local/bin/pgbudget", "probe", "/health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pgbudget"]
CMD ["run"]
