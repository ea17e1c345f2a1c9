# MLflow server with the PostgreSQL and S3 clients baked in (nothing installed at start).
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.8
USER 10001:10001
