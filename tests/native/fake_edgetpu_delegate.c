/*
 * A stand-in for libedgetpu.so.1, built by the tests with the system C compiler.
 *
 * It implements the TFLite external-delegate C API (tflite_plugin_create_delegate /
 * tflite_plugin_destroy_delegate), so the project's delegate-loading code runs against a real
 * shared library through the runtime's own load_delegate. Its Prepare claims no nodes: a plain
 * model then runs on the CPU kernels, and a model compiled for the Edge TPU fails to prepare
 * because nothing provides edgetpu-custom-op -- just as on a machine whose TPU is unusable.
 *
 * Options: a device index of 99 (usb:99, :99) makes creation fail, as asking for a TPU that is
 * not there does; so does any creation while the file named by FAKE_EDGETPU_UNPLUGGED exists
 * (a TPU pulled out: the test plugs it back in by removing the file).
 * Counters are exported for the tests to read with ctypes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Mirrors TfLiteDelegate's layout (tensorflow/lite/core/c/common.h); pointers to TFLite types
 * are opaque here because this delegate never touches them. */
typedef struct FakeDelegate {
  void *data_;
  int (*Prepare)(void *context, struct FakeDelegate *delegate);
  int (*CopyFromBufferHandle)(void *context, struct FakeDelegate *delegate, int handle,
                              void *tensor);
  int (*CopyToBufferHandle)(void *context, struct FakeDelegate *delegate, int handle,
                            void *tensor);
  void (*FreeBufferHandle)(void *context, struct FakeDelegate *delegate, int *handle);
  int64_t flags;
  void *opaque_delegate_builder;
} FakeDelegate;

static int attempt_count = 0;
static int created_count = 0;
static int destroyed_count = 0;
static int prepare_count = 0;
static char last_device[64] = "";

static int fake_prepare(void *context, FakeDelegate *delegate) {
  (void)context;
  (void)delegate;
  prepare_count++;
  return 0; /* kTfLiteOk, no node replaced */
}

FakeDelegate *tflite_plugin_create_delegate(char **keys, char **values, size_t n,
                                            void (*report_error)(const char *)) {
  attempt_count++;
  last_device[0] = '\0';
  const char *unplugged = getenv("FAKE_EDGETPU_UNPLUGGED");
  if (unplugged && *unplugged && access(unplugged, F_OK) == 0) {
    if (report_error) report_error("Failed to open Edge TPU (fake: unplugged)");
    return NULL;
  }
  for (size_t i = 0; i < n; i++) {
    if (strcmp(keys[i], "device") == 0) {
      strncpy(last_device, values[i], sizeof(last_device) - 1);
      last_device[sizeof(last_device) - 1] = '\0';
      size_t len = strlen(values[i]);
      if (len >= 3 && strcmp(values[i] + len - 3, ":99") == 0) {
        if (report_error) report_error("Failed to open Edge TPU device 99 (fake: no such TPU)");
        return NULL;
      }
    }
  }
  FakeDelegate *d = (FakeDelegate *)calloc(1, sizeof(FakeDelegate));
  if (!d) return NULL;
  d->Prepare = fake_prepare;
  created_count++;
  return d;
}

void tflite_plugin_destroy_delegate(FakeDelegate *delegate) {
  if (delegate) {
    destroyed_count++;
    free(delegate);
  }
}

int fake_delegate_attempts(void) { return attempt_count; }
int fake_delegate_created(void) { return created_count; }
int fake_delegate_destroyed(void) { return destroyed_count; }
int fake_delegate_prepared(void) { return prepare_count; }
const char *fake_delegate_last_device(void) { return last_device; }
