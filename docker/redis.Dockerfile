# A Redis image from Debian's package, for machines that reach Debian's mirrors but no image registry.
# Takes redis-server's arguments, like the official image: `docker run IMAGE --appendonly yes`.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["/usr/bin/redis-server"]
CMD ["--dir", "/data", "--bind", "127.0.0.1"]
