// The stacked bit-plane GEMM: C[g] = A_g x B_g^T for every K group g, as ONE CUTLASS b1 AND-popc GEMM.
//   A  activation planes, row-major [Q*M rows][K bits] (plane j of token m is row j*M + m), lda in bits
//   B  weight planes,     row-major [P*N rows][K bits] (plane i of channel n is row i*N + n), ldb in bits
//      (= the column-major [K, P*N] operand of the cutlass_library operation)
//   C  int32, group g at c + g*(P*N)*ldc: element (row r of A, row s of B) at s*ldc + r, i.e. the
//      column-major [Q*M, P*N] output of the operation; ldc >= Q*M, a multiple of the C alignment.
// K groups run as split-K-parallel slices of gemm_k_size = k_group bits, each writing its own C slice.
// The emitter transposes a column-major-output operation, so the kernel's M is P*N and its N is Q*M.
#include "cutlass/cutlass.h"
#include "cutlass/gemm/kernel/default_gemm_universal.h"

ABQC_INSTANCE

using GemmKernel = ABQC_OPERATION;

static_assert(GemmKernel::Mma::Shape::kM == TILE_WROWS && GemmKernel::Mma::Shape::kN == TILE_AROWS &&
              GemmKernel::Mma::Shape::kK == TILE_K, "abqc's grid assumes this threadblock tile");
static_assert(GemmKernel::kThreadCount == THREADS, "abqc launches this many threads per block");
static_assert(sizeof(typename GemmKernel::SharedStorage) <= SMEM_BYTES, "abqc reserves this much shared memory");
static_assert(GemmKernel::kAlignmentA * cutlass::sizeof_bits<typename GemmKernel::ElementA>::value == K_ALIGN_BITS,
              "abqc pads K groups to this many bits");

struct CutlassArgs {
  const void *act;      // A: activation planes
  const void *wt;       // B: weight planes
  int *c;               // C: int32 [G][P*N][ldc]
  int act_rows;         // Q*M
  int wt_rows;          // P*N
  int k_group;          // bits per K group (a multiple of K_ALIGN_BITS)
  int groups;           // G
  long long lda, ldb;   // row strides of A and B in bits
  long long ldc;        // row stride of each C slice in int32 elements
};
static_assert(sizeof(CutlassArgs) == 64, "CutlassArgs must match its ctypes mirror in launch.py");

// The kernel's Params for one launch, built as CUTLASS's host-only Params(Arguments, ...) would build
// them for a split-K-parallel problem with the identity swizzle (tests/test_cutlass_path.py compares
// the two on the host): the kernel is transposed, so its A is the weights and its B the activations.
CUTLASS_HOST_DEVICE typename GemmKernel::Params abqc_params(CutlassArgs const &a) {
  typename GemmKernel::Params p;
  p.problem_size = cutlass::gemm::GemmCoord(a.wt_rows, a.act_rows, a.k_group * a.groups);
  p.grid_tiled_shape = cutlass::gemm::GemmCoord((a.wt_rows + TILE_WROWS - 1) / TILE_WROWS,
                                                (a.act_rows + TILE_AROWS - 1) / TILE_AROWS, a.groups);
  p.swizzle_log_tile = 0;   // GemmIdentityThreadblockSwizzle<1>: block (x, y, z) = tile (m, n, group)
  p.mode = cutlass::gemm::GemmUniversalMode::kGemmSplitKParallel;
  p.batch_count = a.groups;
  p.gemm_k_size = a.k_group;
  p.batch_stride_D = a.ldc * a.wt_rows;
  p.semaphore = nullptr;
  p.params_A = typename GemmKernel::Mma::IteratorA::Params(typename GemmKernel::LayoutA(a.ldb));
  p.params_B = typename GemmKernel::Mma::IteratorB::Params(typename GemmKernel::LayoutB(a.lda));
  p.params_C = typename GemmKernel::Epilogue::OutputTileIterator::Params(typename GemmKernel::LayoutC(a.ldc));
  p.params_D = p.params_C;
  p.output_op = typename GemmKernel::EpilogueOutputOp::Params(1, 0);   // beta 0: C is never read
  p.ptr_A = const_cast<void *>(a.wt);
  p.ptr_B = const_cast<void *>(a.act);
  p.ptr_C = a.c;
  p.ptr_D = a.c;
  p.batch_stride_A = p.batch_stride_B = p.batch_stride_C = 0;
  p.ptr_gather_A_indices = p.ptr_gather_B_indices = p.ptr_scatter_D_indices = nullptr;
  return p;
}

// Launcher entry: device pointers, sizes and leading dimensions in; the stream is the one the host
// passes to cuLaunchKernel. Grid: (ceil(P*N / TILE_WROWS), ceil(Q*M / TILE_AROWS), G), THREADS threads,
// SMEM_BYTES dynamic shared memory. Params are built on the device (CUTLASS's Params constructor is
// host-only), so the cubin needs no host library.
extern "C" __global__ void __launch_bounds__(THREADS) KERNEL_NAME(CutlassArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  GemmKernel::invoke(abqc_params(a), *reinterpret_cast<typename GemmKernel::SharedStorage *>(smem));
}
