-- Run once by the postgres image's entrypoint, on the first start with an empty data volume (it runs every file of
-- /docker-entrypoint-initdb.d in order, with psql, as $POSTGRES_USER): the two databases of the stack, owned by that
-- user. Idempotent (\gexec runs a CREATE only for a database that is missing), so it also works when POSTGRES_DB
-- names one of them. To re-run it, remove the volume: docker compose down -v (this deletes every study and run).
--   optuna: Optuna's studies and trials (the workers' --storage, optuna-dashboard)
--   mlflow: MLflow's runs, params and metrics (mlflow server --backend-store-uri; artifacts live in a volume)
SELECT 'CREATE DATABASE optuna' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna')\gexec
SELECT 'CREATE DATABASE mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
