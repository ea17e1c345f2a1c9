#!/usr/bin/env bash
# Build the Flex Template image and spec, then launch one scoring job.
#   PROJECT=my-project REGION=europe-west4 BUCKET=my-bucket infra/dataflow/build_and_launch.sh \
#     gs://my-bucket/events/dt=2026-01-05/*.parquet gs://my-bucket/scores/dt=2026-01-05
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
INPUT="$1"; OUTPUT="$2"
MODEL="${MODEL:-models:/transactions@champion}"
TRACKING_URI="${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI (reachable from Dataflow)}"
IMAGE="${REGION}-docker.pkg.dev/${PROJECT}/vaewatch/score:0.2.0"
SPEC="gs://${BUCKET}/templates/vaewatch-score.json"
cd "$(dirname "$0")/../.."

# BUILDER=cloudbuild (default) builds remotely with Cloud Build; BUILDER=docker builds and
# pushes with the local docker. A failure of either stops the script with its own message.
case "${BUILDER:-cloudbuild}" in
  cloudbuild)
    gcloud builds submit --project "$PROJECT" --config infra/dataflow/cloudbuild.yaml \
      --substitutions "_IMAGE=$IMAGE" . ;;
  docker)
    docker build -f infra/dataflow/Dockerfile -t "$IMAGE" . && docker push "$IMAGE" ;;
  *) echo "BUILDER must be cloudbuild or docker, not '$BUILDER'" >&2; exit 2 ;;
esac
gcloud dataflow flex-template build "$SPEC" --project "$PROJECT" \
  --image "$IMAGE" --sdk-language PYTHON --metadata-file infra/dataflow/metadata.json

gcloud dataflow flex-template run "vaewatch-score-$(date -u +%Y%m%d-%H%M%S)" \
  --project "$PROJECT" --region "$REGION" --template-file-gcs-location "$SPEC" \
  --parameters input="$INPUT",output="$OUTPUT",model="$MODEL",tracking_uri="$TRACKING_URI" \
  --parameters sdk_container_image="$IMAGE",temp_location="gs://${BUCKET}/tmp"
