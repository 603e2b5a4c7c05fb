# syntax=docker/dockerfile:1
# One Dockerfile, one build stage, a target per image (docker-compose.yml picks them):
#   dispatcher, ws-proxy (with noVNC's library, pinned), blade (blade-agent + TigerVNC + twm).
# MongoDB runs from the official mongo image; it needs no Dockerfile of ours.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# protoc comes vendored (protoc-bin-vendored); blade-agent links libpam. The images get stripped
# binaries (dispatcher 136 → 23 MB, blade-agent 61 → 9, ws-proxy 56 → 9); their debug info stays
# in the build stage's /out/debug (`docker build --target build`, then copy it out) for
# symbolizing backtraces.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpam0g-dev \
 && rm -rf /var/lib/apt/lists/* \
 && cargo build --release --locked -p dispatcher -p blade-agent -p ws-proxy \
 && mkdir -p /out/debug \
 && for b in dispatcher blade-agent ws-proxy; do \
      objcopy --only-keep-debug "target/release/$b" "/out/debug/$b.debug" \
      && strip --strip-debug --strip-unneeded -o "/out/$b" "target/release/$b" \
      && objcopy --add-gnu-debuglink="/out/debug/$b.debug" "/out/$b"; \
    done

FROM debian:bookworm-slim AS dispatcher
RUN useradd --system --uid 10001 --home-dir /var/lib/vncdispatch --create-home vncdispatch
COPY --from=build /out/dispatcher /usr/local/bin/dispatcher
COPY deploy/config/dispatcher.toml /etc/vncdispatch/dispatcher.toml
USER 10001
EXPOSE 7500 9500
ENTRYPOINT ["dispatcher"]
CMD ["serve", "--config", "/etc/vncdispatch/dispatcher.toml"]

# noVNC's library as scripts/install-deps.sh installs it: the npm release, pinned by version and
# checksum (the package has no page of its own; ws-proxy serves its built-in viewer over it).
FROM debian:bookworm-slim AS novnc
ADD --checksum=sha256:32689f18d6abe96bc6530828a6bd0b9ae33bda07c083a6575ed255b5a8f2e903 \
    https://registry.npmjs.org/@novnc/novnc/-/novnc-1.7.0.tgz /tmp/novnc.tgz
RUN tar -xzf /tmp/novnc.tgz -C /tmp && mv /tmp/package /novnc

FROM debian:bookworm-slim AS ws-proxy
RUN useradd --system --uid 10002 --no-create-home ws-proxy
COPY --from=novnc /novnc /usr/local/share/vncdispatch/novnc
COPY --from=build /out/ws-proxy /usr/local/bin/ws-proxy
COPY deploy/config/ws-proxy.toml /etc/vncdispatch/ws-proxy.toml
USER 10002
EXPOSE 6080 9502
ENTRYPOINT ["ws-proxy"]
CMD ["serve", "--config", "/etc/vncdispatch/ws-proxy.toml"]

FROM debian:bookworm-slim AS blade
# The agent starts desktops as their users, so it runs as root (as under systemd); users come
# from the image here, from NSS (LDAP, sssd) on a real blade.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tigervnc-standalone-server tigervnc-tools \
      twm xfonts-base x11-xserver-utils \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --shell /bin/bash demo
COPY --from=build /out/blade-agent /usr/local/bin/blade-agent
COPY deploy/config/blade-agent.toml /etc/blade-agent/blade-agent.toml
COPY deploy/demo-session /usr/local/bin/demo-session
COPY deploy/pam/vncdispatch /etc/pam.d/vncdispatch
EXPOSE 7501 9501 5901-6000
ENTRYPOINT ["blade-agent"]
CMD ["serve", "--config", "/etc/blade-agent/blade-agent.toml"]
