//! MapReduce: applications, the task table, the coordinator and the workers.
