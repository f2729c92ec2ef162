FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gatecast gatecast
COPY service service
COPY training training
RUN pip install --no-cache-dir .
COPY models models
EXPOSE 8500 9100
ENV GATECAST_HOST=0.0.0.0 GATECAST_REPO=/app/models
CMD ["gatecast", "serve"]
