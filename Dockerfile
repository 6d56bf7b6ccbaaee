# stockledger: slim Python, non-root, the package installed; migrate then serve on MySQL.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STOCKLEDGER_DATA_DIR=/var/lib/stockledger \
    PROMETHEUS_MULTIPROC_DIR=/tmp/stockledger-metrics
RUN useradd --system --uid 10001 --home-dir /var/lib/stockledger --create-home stockledger
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY docker/entrypoint.sh /usr/local/bin/stockledger-entrypoint
RUN chmod 0755 /usr/local/bin/stockledger-entrypoint
USER stockledger
WORKDIR /var/lib/stockledger
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"
ENTRYPOINT ["stockledger-entrypoint"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
