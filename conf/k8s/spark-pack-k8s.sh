#!/usr/bin/env bash
# The pack job on Spark's native Kubernetes scheduler (spark-submit --master k8s://).
# The image must hold Spark 4.0, Python 3.11 with this project installed, libhdfs and
# the cluster's Hadoop client configuration in a ConfigMap (hadoop-conf), which Spark mounts
# on the driver and executors as HADOOP_CONF_DIR; see README.
# Cluster mode ships the driver into the cluster too, so the script path is inside the image.
set -euo pipefail
APISERVER="${APISERVER:-https://kubernetes.default.svc:443}"
IMAGE="${IMAGE:-registry.example.com/speechpack-spark:latest}"

spark-submit \
  --master "k8s://${APISERVER}" \
  --deploy-mode cluster \
  --name speechpack-pack \
  --conf spark.kubernetes.container.image="${IMAGE}" \
  --conf spark.kubernetes.namespace=speech \
  --conf spark.kubernetes.authenticate.driver.serviceAccountName=spark \
  --conf spark.executor.instances=16 \
  --conf spark.executor.cores=4 \
  --conf spark.executor.memory=8g \
  --conf spark.kubernetes.hadoop.configMapName=hadoop-conf \
  --conf spark.pyspark.python=python3.11 \
  local:///opt/speechpack/spark_jobs/pack.py \
  --input hdfs://namenode:8020/corpora/librispeech \
  --output hdfs://namenode:8020/datasets/librispeech-960 \
  --shard-size-mb 256
