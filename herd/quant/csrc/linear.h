/* A linear layer's rows shared between the threads of a team (linear.c). */
#pragma once

#include "activations.h"

/* Thread t of nt's share [*n0, *n1) of N rows, in whole pairs (*n1 may be N + 1 when N is odd). */
void share(i64 N, int t, int nt, i64 *n0, i64 *n1);
/* Thread t of nt's share of y = x W^T, for a prepared input (input_prepare). */
void linear_share(const Linear *L, const Input *in, int t, int nt, float *y);
