# stockledger: slim Python, non-root; dependencies pinned with hashes from requirements.lock
# (refresh: uv pip compile pyproject.toml --generate-hashes --python-version 3.11 --universal
# -o requirements.lock), the package itself installed without resolving anything.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STOCKLEDGER_DATA_DIR=/var/lib/stockledger \
    STOCKLEDGER_LOG_FORMAT=json
RUN useradd --system --uid 10001 --home-dir /var/lib/stockledger --create-home stockledger
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock && rm /tmp/requirements.lock
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
USER stockledger
WORKDIR /var/lib/stockledger
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"
# Against MySQL, run `migrate` first (docker-compose.yml does, once, as its own service); the
# embedded default migrates its SQLite file itself. With --workers > 1 metrics switch to
# prometheus-client's multiprocess mode on their own.
ENTRYPOINT ["stockledger"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
