# pgbudget: multi-stage build, small runtime image. SIGTERM drains (finish transactions, Terminate servers, exit 0).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
# Without the DuckLake telemetry warehouse (feature `lake` needs libduckdb.so from scripts/lake-deps; see LAKE_HOOKS.md).
RUN cargo build --release --locked --no-default-features --bin pgbudget && strip target/release/pgbudget

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 pgbudget
COPY --from=build /src/target/release/pgbudget /usr/local/bin/pgbudget
COPY budgets.toml /etc/pgbudget/budgets.toml
USER pgbudget
ENV PGBUDGET_CONFIG=/etc/pgbudget/budgets.toml PGBUDGET_LISTEN=0.0.0.0:6432
EXPOSE 6432
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pgbudget"]
CMD ["run"]
